"""Scale: does memory grow with the dataset? Training worker and driver peak RSS at two dataset sizes.

Workers report two figures: peak RSS (ru_maxrss, which also counts the pages of the memory-mapped records they
have read: page cache the kernel reclaims at will) and peak anonymous RSS (the memory the process really holds).

Pairs of incompressible (noise) PNGs at a real image size, written in row groups so that making them holds one
group at a time; then `run_train` for a few steps with 2 workers in a driver subprocess of its own (its peak RSS
is the driver's), each worker reporting its own peak RSS in summary.json.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

from pipelines.bench.child import run_child
from pipelines.bench.meter import load_avg


def write_noise_pairs(folder: Path, n: int, px: int, rows_per_file: int = 256, seed: int = 0) -> Path:
    """`n` trainable pairs whose images are px x px noise PNGs (~3 bytes a pixel: PNG cannot compress noise)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for start in range(0, n, rows_per_file):
        count = min(rows_per_file, n - start)
        images = []
        for _ in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(buf, "PNG")
            images.append(buf.getvalue())
        ids = [f"p{start + i:07d}" for i in range(count)]
        pq.write_table(pa.table({"pair_id": ids, "image": pa.array(images, pa.binary()),
                                 "question": ["Describe this image."] * count,
                                 "chosen": ["a field of coloured noise"] * count,
                                 "rejected": ["a red car on a street"] * count}),
                       folder / f"part-{start // rows_per_file:05d}.parquet")
    return folder


def train_child(address: str, model: str, data: str, out: str, steps: int) -> dict:
    from cluster.connect import connect
    from cluster.resources import WorkersConfig
    from pipelines.train.config import TrainConfig
    from pipelines.train.job import run_train
    connect(address)
    cfg = TrainConfig(model=model, max_steps=steps, save_steps=steps, per_device_batch_size=1, report_to=["none"],
                      learning_rate=1e-4, warmup_ratio=0.0, workers=WorkersConfig(num_workers=2, num_cpus=0.5))
    t0 = time.time()
    summary = run_train(cfg, data, out, resume=False)
    return {"seconds": round(time.time() - t0, 1), "worker_peak_rss_mb": summary["peak_rss_mb_by_rank"],
            "worker_peak_anon_mb": summary["peak_anon_mb_by_rank"],
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rows_used": summary["rows_used"], "steps": summary["steps"]}


def bench_scale(work: Path, tiny: Path, sizes=(1000, 16000), px: int = 512, steps: int = 4) -> dict:
    """Training memory at two dataset sizes: how much each peak RSS grows for `sizes[1] / sizes[0]` the pairs."""
    import ray

    from pipelines.models.tiny import make_tiny
    model = make_tiny(tiny, names=["llava"])["llava"]
    address = ray.get_runtime_context().gcs_address
    runs = []
    for n in sizes:
        data = write_noise_pairs(work / f"scale-pairs-{n}-{px}", n, px)
        run = run_child("train-child", {"address": address, "model": str(model), "data": str(data),
                                        "out": str(work / f"scale-train-{n}"), "steps": steps})
        runs.append({"pairs": n, "parquet_mb": round(sum(f.stat().st_size for f in data.glob("*.parquet")) / 2**20),
                     **run})
    small, big = runs[0], runs[-1]
    return {"px": px, "steps": steps, "runs": runs, "pairs_ratio": round(big["pairs"] / small["pairs"], 2),
            "worker_rss_ratio": round(max(big["worker_peak_rss_mb"]) / max(small["worker_peak_rss_mb"]), 3),
            "worker_anon_ratio": round(max(big["worker_peak_anon_mb"]) / max(small["worker_peak_anon_mb"]), 3),
            "driver_rss_ratio": round(big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3),
            "load_avg_after": load_avg()}
