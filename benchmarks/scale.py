"""Scale: does memory or finalize cost grow with the dataset?

Training: worker and driver peak RSS at two dataset sizes. Workers report two figures: peak RSS (VmHWM, which
also counts the pages of the memory-mapped records they have read: page cache the kernel reclaims at will) and
peak anonymous RSS (the memory the process really holds).

Views: `finalize` over a scored/ log of noise pairs (a full fold, in a process of its own: its peak RSS), then
one more shard on top (a resume's fold) against the same shard folded alone.

Generation (genscale.py): the driver's peak RSS of `run_generate` at two prompt counts, with the tiny models
and/or the cluster simulation's stand-in stages.

Pairs are incompressible noise PNGs at a real image size (zlib stored blocks: noise does not compress, and
encoding 16K of them takes a minute instead of an hour), written a file at a time.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from benchmarks.child import run_child
from benchmarks.meter import load_avg, median, peak_rss_mb


def noise_png(rng, px: int) -> bytes:
    """A px x px RGB PNG of uniform noise (~3 bytes a pixel, what any PNG encoder would make of it)."""
    import struct
    import zlib

    import numpy as np

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    raw = np.zeros((px, 1 + 3 * px), np.uint8)  # each scanline: filter byte 0, then RGB
    raw[:, 1:] = np.frombuffer(rng.bytes(3 * px * px), np.uint8).reshape(px, 3 * px)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", px, px, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 0)) + chunk(b"IEND", b""))


def _noise_rows(rng, start: int, count: int, px: int) -> dict:
    ids = [f"p{start + i:07d}" for i in range(count)]
    return {"pair_id": ids, "image": [noise_png(rng, px) for _ in range(count)],
            "question": ["Describe this image."] * count, "chosen": ["a field of coloured noise"] * count,
            "rejected": ["a red car on a street"] * count}


def write_noise_pairs(folder: Path, n: int, px: int, rows_per_file: int = 256, seed: int = 0) -> Path:
    """`n` trainable pairs whose images are px x px noise PNGs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for start in range(0, n, rows_per_file):
        rows = _noise_rows(rng, start, min(rows_per_file, n - start), px)
        pq.write_table(pa.table({**rows, "image": pa.array(rows["image"], pa.binary())}),
                       folder / f"part-{start // rows_per_file:05d}.parquet")
    return folder


def write_noise_scored(scored: Path, n: int, px: int, rows_per_shard: int = 64, start: int = 0, seed: int = 0):
    """`n` rows of a scored/ log (every column the views read), as shards named like the sink's, in write order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.rewards import RewardScorer
    scored.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for first in range(start, start + n, rows_per_shard):
        count = min(rows_per_shard, start + n - first)
        rows = _noise_rows(rng, first, count, px)
        terms = {c: [[["car"], []] if c == "hallucinated" else [0.5, -0.5]] * count for c in RewardScorer.ADDS}
        table = pa.table({**rows, "image": pa.array(rows["image"], pa.binary()), "pair_key": rows["pair_id"],
                          "prompt_id": rows["pair_id"], "answers": [[rows["chosen"][0], rows["rejected"][0]]] * count,
                          "answer_models": [["m-a", "m-b"]] * count, **terms,
                          "chosen_index": pa.array([0] * count, pa.int32()),
                          "rejected_index": pa.array([1] * count, pa.int32()),
                          "chosen_reward": [0.5] * count, "rejected_reward": [-0.5] * count, "margin": [1.0] * count,
                          "drop_reason": pa.nulls(count, pa.string()), "error": pa.nulls(count, pa.string())})
        pq.write_table(table, scored / f"shard-{time.time_ns():020d}-{first:07d}.parquet")


def finalize_child(out: str, rows_per_file: int) -> dict:
    """One finalize in a process of its own: its wall time, CPU time and the process's peak RSS."""
    import pyarrow.compute  # noqa: F401  imported before the clock starts: a fold's cost, not an import's
    import pyarrow.dataset  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import pipelines.generate.outputs as outputs
    t0, c0 = time.time(), time.process_time()
    counts = outputs.finalize(Path(out), rows_per_file)
    return {"seconds": round(time.time() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 3),
            "counts": counts,
            "peak_rss_mb": peak_rss_mb()}


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _mb(folder: Path) -> int:
    return round(_bytes(folder) / 2**20)


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
            "driver_peak_rss_mb": peak_rss_mb(),
            "rows_used": summary["rows_used"], "steps": summary["steps"], "records_mb": summary["records_mb"]}


def bench_scale(work: Path, tiny: Path, sizes=(1000, 16000), px: int = 512, steps: int = 4,
                fold_pairs: int | None = None, rows_per_shard: int = 64, rows_per_file: int = 1000,
                gen: dict | None = None) -> dict:
    """Per size: a scored/ log, its full fold (finalize) and DPO on the pairs it gives; then the views figures
    at `fold_pairs` (default: the larger size, on its folder once trained); then the generation points of `gen`
    (genscale.py: {"sim": sizes, "real": sizes, "prompt_s": s, "sim_overrides": [...]}). Every folder is removed
    once measured (16K pairs at 512 px are ~12 GB per copy); figures so far are kept in work/scale-partial.json."""
    import json

    import ray

    from pipelines.models.tiny import make_tiny
    model = make_tiny(tiny, names=["llava"])["llava"]
    address = ray.get_runtime_context().gcs_address
    out: dict = {"px": px, "steps": steps, "runs": []}

    def keep():
        (work / "scale-partial.json").write_text(json.dumps(out, indent=1))
    views = None
    for n in sizes:
        run = work / f"scale-{n}-{px}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.time()
        write_noise_scored(run / "scored", n, px, rows_per_shard)
        made = round(time.time() - t0, 1)
        fold = run_child("finalize-child", {"out": str(run), "rows_per_file": rows_per_file})
        train = run_child("train-child", {"address": address, "model": str(model), "data": str(run / "pairs"),
                                          "out": str(run / "train"), "steps": steps})
        out["runs"].append({"pairs": n, "parquet_mb": _mb(run / "pairs"), "scored_mb": _mb(run / "scored"),
                            "train_folder_mb": _mb(run / "train"),
                            # the records a node trains on (built in its scratch folder) against the pairs they hold
                            "train_data_mb": train["records_mb"],
                            "train_data_ratio": round(train["records_mb"] * 2**20 / max(1, _bytes(run / "pairs")), 3),
                            "write_seconds": made, "finalize": fold, **train})
        keep()
        if n == sizes[-1] and fold_pairs in (None, n):   # the views figures on this folder: no second 12 GB log
            shutil.rmtree(run / "train", ignore_errors=True)
            views = bench_views(work, n, px, rows_per_shard, rows_per_file, run=run, full=fold, made=made)
        shutil.rmtree(run, ignore_errors=True)
    views = views or bench_views(work, fold_pairs, px, rows_per_shard, rows_per_file)
    small, big = out["runs"][0], out["runs"][-1]
    out.update({"views": views, "pairs_ratio": round(big["pairs"] / small["pairs"], 2),
                "worker_rss_ratio": round(max(big["worker_peak_rss_mb"]) / max(small["worker_peak_rss_mb"]), 3),
                "worker_anon_ratio": round(max(big["worker_peak_anon_mb"]) / max(small["worker_peak_anon_mb"]), 3),
                "driver_rss_ratio": round(big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3),
                "train_data_ratio": big["train_data_ratio"],
                "finalize_pairs_ratio": round(views["pairs"] / small["pairs"], 2),
                "finalize_rss_ratio": round(views["full"]["peak_rss_mb"] / small["finalize"]["peak_rss_mb"], 3),
                "resume_ratio": views["resume_ratio"]})
    keep()
    from benchmarks.genscale import bench_generation
    for mode in ("sim", "real"):     # the sim first: the real tiny models take the longest
        if (gen or {}).get(mode):
            out[f"generation_{mode}"] = bench_generation(
                work, tiny, gen[mode], mode, gen.get("prompt_s", 0.005),
                gen.get("sim_overrides", ()) if mode == "sim" else ())
            out[f"gen_{mode}_rss_ratio"] = out[f"generation_{mode}"]["rss_ratio"]
            keep()
    out["load_avg_after"] = load_avg()
    return out


def bench_views(work: Path, n: int, px: int, rows_per_shard: int, rows_per_file: int, repeats: int = 3,
                run: Path | None = None, full: dict | None = None, made: float | None = None) -> dict:
    """Fold `n` pairs from scratch (or take `run`, already folded: `full`), then `repeats` times one more shard on
    top (a resume) and that shard alone in a folder of its own: a resume should cost about what its shard costs,
    not what the folder holds."""
    alone = work / f"views-alone-{px}"
    args = {"rows_per_file": rows_per_file}
    if run is None:
        run = work / f"views-{n}-{px}"
        for d in (run, alone):
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.time()
        write_noise_scored(run / "scored", n, px, rows_per_shard)
        made = round(time.time() - t0, 1)
        full = run_child("finalize-child", {**args, "out": str(run)})
    args["out"] = str(run)
    resumes, alones = [], []
    for i in range(repeats):
        before = set((run / "scored").iterdir())
        write_noise_scored(run / "scored", rows_per_shard, px, rows_per_shard, start=n + i * rows_per_shard, seed=i + 1)
        (new,) = set((run / "scored").iterdir()) - before
        resumes.append(run_child("finalize-child", args))
        shutil.rmtree(alone, ignore_errors=True)
        (alone / "scored").mkdir(parents=True)
        shutil.copy(new, alone / "scored" / new.name)
        alones.append(run_child("finalize-child", {"out": str(alone), "rows_per_file": rows_per_file}))
    sizes = {"scored_mb": _mb(run / "scored"), "pairs_mb": _mb(run / "pairs"), "candidates_mb": _mb(run / "candidates"),
             "state_kb": round(sum(f.stat().st_size for f in (run / ".views").iterdir()) / 1024, 1)}
    for d in (run, alone):
        shutil.rmtree(d, ignore_errors=True)
    return {"pairs": n, "shard_rows": rows_per_shard, "write_seconds": made, **sizes, "full": full,
            **resume_figures(resumes, alones)}


def resume_figures(resumes: list[dict], alones: list[dict]) -> dict:
    """The resume's cost against its shard alone. The ratio is the median of the pairs' ratios (each resume and
    its shard alone run back to back): sub-second CPU figures swing several-fold when the load changes between
    repeats, and a pair sees the same load (measured: medians of each side gave 6.3x where the pairs gave 1.5x)."""
    resume_cpu, alone_cpu = median([r["cpu_seconds"] for r in resumes]), median([r["cpu_seconds"] for r in alones])
    pairs = [r["cpu_seconds"] / max(a["cpu_seconds"], 1e-9) for r, a in zip(resumes, alones)]
    return {"resumes": resumes, "alones": alones, "resume_cpu_s": resume_cpu, "alone_cpu_s": alone_cpu,
            "resume_wall_s": median([r["seconds"] for r in resumes]), "alone_wall_s": median([r["seconds"] for r in alones]),
            "resume_pair_ratios": [round(x, 2) for x in pairs], "resume_ratio": round(median(pairs), 2),
            "resume_ratio_of_medians": round(resume_cpu / alone_cpu, 2)}
