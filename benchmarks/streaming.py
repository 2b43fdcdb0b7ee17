"""Streaming and scaling: `generate` against the loop a user would write, and two sizes' driver memory.

streaming  the pipeline vs a plain script run as a user runs it, a fresh Python process (loop.py: the models
           loaded directly, stage after stage, B prompts per model call), same prompt rows
scaling    two sizes (2K-vs-9K proportions), one driver subprocess each: wall-time and driver peak-RSS ratios
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from benchmarks.child import REPO, run_child
from benchmarks.meter import CpuMeter, load_avg, peak_rss_mb

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


def compare_images(loop_dir: Path, pipe_dir: Path) -> dict:
    """Which best image each run kept (by its seed) and, where they agree, how far apart the pixels are: the
    loop renders the same seeds, B per diffusers call, so its images match ours up to float rounding."""
    import numpy as np
    import pyarrow.dataset as pads

    from actors.common.runtime import open_png
    cols = ["prompt_id", "seed", "image"]
    loop = {r["prompt_id"]: r for r in pads.dataset(str(loop_dir), format="parquet").to_table(columns=cols).to_pylist()}
    pipe = {r["prompt_id"]: r for r in pads.dataset(str(pipe_dir), format="parquet").to_table(columns=cols).to_pylist()}
    both = sorted(loop.keys() & pipe.keys())
    same = [p for p in both if loop[p]["seed"] == pipe[p]["seed"]]
    diff = [int(np.abs(np.asarray(open_png(loop[p]["image"]), int) - np.asarray(open_png(pipe[p]["image"]), int)).max())
            for p in same]
    return {"best_seed_agreement": round(len(same) / max(1, len(both)), 3),
            "image_max_level_diff": max(diff, default=0)}


def run_loop_command(cfg, out: Path, batch: int, threads: int | None) -> dict:
    """The loop as the command a user would time: `python -m benchmarks.loop CONFIG` in a fresh process,
    imports and model loads included (`command_seconds`); its own `seconds` start after the imports."""
    import subprocess
    import sys

    import yaml
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.loop", str(config), "--out", str(out),
                           "--batch", str(batch), "--threads", str(threads or 0)],
                          cwd=REPO, check=True, capture_output=True, text=True)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "command_seconds": round(time.time() - t0, 2)}


def import_cpu_seconds() -> float:
    """CPU-s a fresh Python pays to import what the loop uses (torch, transformers, diffusers): a user's script
    pays it on every run; the in-process loop below does not, its imports are done by then."""
    import subprocess
    import sys
    with CpuMeter() as m:
        subprocess.run([sys.executable, "-c", "import torch, transformers; from diffusers import DiffusionPipeline"],
                       check=True, capture_output=True)
    return round(m.seconds, 1)


def bench_streaming(work: Path, tiny: Path, n_prompts: int = 2048, overrides=(), batch: int = 4,
                    loop_threads: int | None = 1, loop_imports: bool = True, ray_start_s: float | None = None,
                    repeats: int = 1) -> dict:
    """Pipeline vs the plain loop (loop.py, `batch` prompts per model call, `loop_threads` torch threads: its
    best here) on the same prompt rows, back to back (the loop first, as a command: run_loop_command), `repeats`
    times in turn (loop, pipeline, loop, pipeline...): a virtual machine's speed drifts by 10-40% within
    minutes here, so each pair gives a ratio and the figures reported are those of the pair with the median ratio
    (the lower middle one of an even count); every pair is listed under `pairs_of_runs`. Two ratios: against the
    loop's command (`ratio`: a user's script pays its imports; the pipeline runs on a Ray that is up, as on a
    cluster) and against its wall after the imports (`ratio_loop_after_imports`). `loop_imports`: also measure
    the imports alone (a Python subprocess, several CPU-s). `ray_start_s`: the seconds a local Ray took to
    start (the caller's), for a third ratio: a command that starts Ray first."""
    load0 = load_avg()
    runs = [_pair(work, tiny, n_prompts, overrides, batch, loop_threads) for _ in range(max(1, repeats))]
    median_pair = sorted(runs, key=lambda r: r["ratio"])[(len(runs) - 1) // 2]
    imports = import_cpu_seconds() if loop_imports else 0.0
    loop, manifest, pipe_s = median_pair["loop"], median_pair["manifest"], median_pair["pipeline_seconds"]
    loop_cpu, pipe_cpu = median_pair["loop_cpu"], median_pair["pipe_cpu"]
    cfg_out = median_pair["output_dir"]
    return {"prompts": n_prompts, **{k: median_pair[k] for k in HEADLINE}, "loop_seconds": loop["seconds"],
            "loop_stage_seconds": loop["stage_seconds"], "loop_batch": batch,
            "loop_torch_threads": loop["torch_threads"],
            "pipeline_timings": manifest["timings_s"],
            "loop_prompts_per_s": round(n_prompts / loop["command_seconds"], 3),
            "pipeline_prompts_per_s": round(n_prompts / pipe_s, 3),
            "ratio_loop_after_imports": round(loop["seconds"] / pipe_s, 3),
            **({"ray_start_seconds": round(ray_start_s, 2),
                "ratio_with_ray_start": round(loop["command_seconds"] / (pipe_s + ray_start_s), 3)}
               if ray_start_s is not None else {}),
            "loop_import_cpu_seconds": imports, "meter_own_cpu_seconds": round(pipe_cpu.own, 1),
            "cpu_ratio_loop_after_imports": round(pipe_cpu.seconds / max(loop_cpu.seconds - imports, 1e-9), 3),
            "pipeline_cpu_by_process": {k: round(v, 1) for k, v in sorted(pipe_cpu.by_name.items(),
                                                                           key=lambda kv: -kv[1]) if v >= 0.5},
            "pairs_of_runs": [{k: r[k] for k in PAIR_FIGURES} for r in runs],
            "questions": manifest["counts"]["questions"], "loop_questions": loop["questions"],
            "pairs": manifest["counts"]["pairs"], "loop_pairs": loop["pairs"],
            "dropped": sum(manifest["counts"]["dropped"].values()), "errors": manifest["counts"]["errors"],
            "loop_dropped": loop["dropped"],
            # the last pair's folders (each pair writes the same ones; the work is the same)
            **compare_images(work / "stream-loop" / "pairs", Path(cfg_out) / "pairs"),
            "load_avg_before": load0, "load_avg_after": load_avg()}


# The median pair's figures that head the result (the rest of its figures are derived there).
HEADLINE = ("loop_command_seconds", "pipeline_seconds", "ratio", "ratio_without_loop_steal", "loop_cpu_seconds",
            "pipeline_cpu_seconds", "cpu_ratio")
# What `pairs_of_runs` lists for each loop-then-pipeline pair (steal: CPU-s the hypervisor took, all cores).
PAIR_FIGURES = ("loop_command_seconds", "pipeline_seconds", "ratio", "loop_cpu_seconds", "pipeline_cpu_seconds",
                "cpu_ratio", "first_pair", "loop_steal_seconds", "pipeline_steal_seconds", "ratio_without_loop_steal")


def _pair(work: Path, tiny: Path, n_prompts: int, overrides, batch: int, loop_threads: int | None) -> dict:
    """One loop command, then one pipeline run, each on fresh output folders."""
    from pipelines.folder import RunFolder
    from pipelines.generate.job import prepare, run_generate
    cfg = tiny_run_config(work / "stream-pipeline", tiny, n_prompts, overrides)
    RunFolder(cfg).clear()
    prompts, vocab, _ = prepare(cfg)
    shutil.rmtree(work / "stream-loop", ignore_errors=True)
    with CpuMeter() as loop_cpu:   # the loop reads the same prompt rows from the same config
        loop = run_loop_command(cfg, work / "stream-loop", batch, loop_threads)
    t0 = time.time()
    with CpuMeter() as pipe_cpu:
        manifest = run_generate(cfg, prepared=(prompts, vocab, Path(cfg.output_dir)))
    pipe_s = time.time() - t0
    return {"loop": loop, "manifest": manifest, "loop_cpu": loop_cpu, "pipe_cpu": pipe_cpu,
            "output_dir": cfg.output_dir, "loop_command_seconds": loop["command_seconds"],
            "pipeline_seconds": round(pipe_s, 2), "ratio": round(loop["command_seconds"] / pipe_s, 3),
            "loop_cpu_seconds": round(loop_cpu.seconds, 1), "pipeline_cpu_seconds": round(pipe_cpu.seconds, 1),
            "cpu_ratio": round(pipe_cpu.seconds / max(loop_cpu.seconds, 1e-9), 3),
            "first_pair": manifest["timings_s"].get("first_pair"),
            "loop_steal_seconds": loop_cpu.steal, "pipeline_steal_seconds": pipe_cpu.steal,
            # The loop keeps one core busy, so the time the hypervisor took while it ran is mostly its own; taken
            # off its wall (the pipeline's left in: a conservative ratio).
            "ratio_without_loop_steal": (None if loop_cpu.steal is None else
                                         round((loop["command_seconds"] - loop_cpu.steal) / pipe_s, 3))}


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
            "peak_rss_mb": peak_rss_mb()}


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
