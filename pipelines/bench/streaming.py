"""Streaming and scaling: `generate` against the same chain in one process, and two sizes' driver memory.

streaming  the pipeline vs the chain run in this process (`run_in_process`), same prompts and batch sizes
scaling    two sizes (2K-vs-9K proportions), one driver subprocess each: wall-time and driver peak-RSS ratios
"""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

from pipelines.bench.child import REPO, run_child
from pipelines.bench.meter import CpuMeter, load_avg

TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def tiny_run_config(out: Path, tiny: Path, n_prompts: int, overrides=()):
    """configs/tiny.yaml at n_prompts, pointed at the tiny models under `tiny` and output under `out`."""
    from pipelines.config import load_config
    from pipelines.models.tiny import make_tiny
    models = make_tiny(tiny)
    sets = [f"output_dir={out}", "tiny_models=null", f"prompts.num_prompts={n_prompts}",
            f"images.model={models['sd']}", f"selection.model={models['clip']}",
            f"rewards.text_model={models['reward']}", f"rewards.clip_model={models['clip']}",
            f"train.model={models['llava']}"]
    cfg = load_config(TINY_CONFIG, sets + list(overrides))
    for s, name in zip(cfg.samplers, ("llava", "llava-b")):
        s.model = str(models[name])
    return cfg


def run_loop(cfg, rows, vocab, out: Path) -> dict:
    """The baseline: the same stage chain in one process, chunk by chunk, with the pools' batch sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.generate.chain import LocalChain, prompt_table
    from pipelines.generate.outputs import finalize
    t0 = time.time()
    chain = LocalChain(cfg, vocab)
    t_load = time.time() - t0
    done = list(chain(prompt_table(rows)))
    shutil.rmtree(out, ignore_errors=True)
    (out / "scored").mkdir(parents=True)
    pq.write_table(pa.concat_tables(done, promote_options="permissive"), out / "scored" / "shard-loop.parquet")
    counts = finalize(out, cfg.min_rows_per_file)
    return {"seconds": time.time() - t0, "load_seconds": t_load, "pairs": counts["pairs"]}


def _pair_set(folder: Path) -> set:
    import pyarrow.dataset as pads
    t = pads.dataset(str(folder), format="parquet").to_table(columns=["pair_id", "chosen", "rejected", "image"])
    return {(r["pair_id"], r["chosen"], r["rejected"], r["image"]) for r in t.to_pylist()}


def bench_streaming(work: Path, tiny: Path, n_prompts: int = 2048, overrides=()) -> dict:
    """Pipeline vs loop on the same prompt rows, back to back in this process (the loop first)."""
    from pipelines.folder import RunFolder
    from pipelines.generate.job import prepare, run_generate
    cfg = tiny_run_config(work / "stream-pipeline", tiny, n_prompts, overrides)
    RunFolder(cfg).clear()
    rows, vocab, _ = prepare(cfg)
    load0 = load_avg()
    with CpuMeter() as loop_cpu:
        loop = run_loop(cfg, rows, vocab, work / "stream-loop")
    t0 = time.time()
    with CpuMeter() as pipe_cpu:
        manifest = run_generate(cfg, prepared=(rows, vocab, Path(cfg.output_dir)))
    pipe_s = time.time() - t0
    same = _pair_set(work / "stream-loop" / "pairs") == _pair_set(Path(cfg.output_dir) / "pairs")
    return {"prompts": n_prompts, "loop_seconds": round(loop["seconds"], 2),
            "loop_load_seconds": round(loop["load_seconds"], 2), "pipeline_seconds": round(pipe_s, 2),
            "pipeline_timings": manifest["timings_s"],
            "loop_prompts_per_s": round(n_prompts / loop["seconds"], 3),
            "pipeline_prompts_per_s": round(n_prompts / pipe_s, 3),
            "ratio": round(loop["seconds"] / pipe_s, 3),
            "loop_cpu_seconds": round(loop_cpu.seconds, 1), "pipeline_cpu_seconds": round(pipe_cpu.seconds, 1),
            "pipeline_cpu_by_process": {k: round(v, 1) for k, v in sorted(pipe_cpu.by_name.items(),
                                                                           key=lambda kv: -kv[1]) if v >= 0.5},
            "pairs": manifest["counts"]["pairs"], "loop_pairs": loop["pairs"], "same_pairs": same,
            "load_avg_before": load0, "load_avg_after": load_avg()}


def scaling_child(address: str, tiny: str, out: str, n_prompts: int) -> dict:
    from cluster.connect import connect
    from pipelines.folder import RunFolder
    from pipelines.generate.job import run_generate
    connect(address)
    cfg = tiny_run_config(Path(out), Path(tiny), n_prompts)
    RunFolder(cfg).clear()
    t0 = time.time()
    manifest = run_generate(cfg)
    return {"prompts": n_prompts, "seconds": round(time.time() - t0, 2), "pairs": manifest["counts"]["pairs"],
            "stream_seconds": manifest["timings_s"]["stream"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def bench_scaling(work: Path, tiny: Path, sizes=(500, 2250)) -> dict:
    import ray
    address = ray.get_runtime_context().gcs_address
    runs = [run_child("scaling-child", {"address": address, "tiny": str(tiny), "out": str(work / f"scale-{n}"),
                                     "n_prompts": n}) for n in sizes]
    small, big = runs[0], runs[-1]
    return {"runs": runs, "work_ratio": round(big["prompts"] / small["prompts"], 3),
            "wall_ratio": round(big["seconds"] / small["seconds"], 3),
            "rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "load_avg_after": load_avg()}
