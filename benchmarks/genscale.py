"""Generation driver memory against the number of prompts: `run_generate`, the library path of
`synthalign generate`, in a driver subprocess of its own per size, on a prompts file the bench writes. The
figure is the driver's VmHWM (Ray Data's streaming executor runs in the driver), plus its RSS sampled along.

real  configs/tiny.yaml with its tiny models on the caller's Ray (20K prompts: ~35 min of 2 cores)
sim   the same config, chain, columns, shard writes and finalize, with the cluster simulation's stand-ins
      (sim.py) for the model stages, costed at `prompt_s` seconds of stand-in work per prompt, on a private
      local Ray whose workers inherit the stand-ins' settings: 10x the prompts in minutes
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from actors.common.runtime import status_mb
from benchmarks.child import run_child
from benchmarks.meter import load_avg, peak_rss_mb


def write_prompts_file(path: Path, n: int, seed: int = 0) -> Path:
    """`n` prompts (tiny.yaml's generator: objects, gt_objects, two instructions each) as a .jsonl file."""
    from actors.prompts import PromptsConfig, iter_prompts
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:   # a row at a time: the bench process holds no prompt list either
        for r, _ in iter_prompts(PromptsConfig(num_prompts=n, seed=seed, instructions_per_prompt=2)):
            f.write(json.dumps({k: r[k] for k in ("prompt_id", "image_prompt", "instructions", "gt_objects")}) + "\n")
    return path


def _rss_mb() -> float:
    return status_mb("VmRSS") or 0.0


def _sim_env(cfg, out: Path, prompt_s: float, image_bytes: int) -> str:
    """The stand-ins' per-item seconds: `prompt_s` a prompt, split between the stages as the plan's A100 costs."""
    from pipelines.plan import default_costs, items_per_prompt
    costs, items = default_costs(cfg), items_per_prompt(cfg)
    per_prompt = sum(costs[k] * rows * n for k, (rows, n) in items.items())
    (out / "simlog").mkdir(parents=True, exist_ok=True)
    return json.dumps({"per_item": {k: c * prompt_s / per_prompt for k, c in costs.items()},
                       "log_dir": str(out / "simlog"), "image_bytes": image_bytes})


def generation_child(tiny: str, out: str, prompts_file: str, address: str | None = None,
                     prompt_s: float | None = None, image_bytes: int = 12288, overrides=()) -> dict:
    from benchmarks.sim import SIM_ENV, SIM_STAGES
    from benchmarks.streaming import tiny_run_config
    from cluster.connect import connect
    from pipelines.folder import RunFolder
    from pipelines.generate.job import run_generate
    out_p = Path(out)
    cfg = tiny_run_config(out_p / "run", Path(tiny), 0, ["prompts.source=file", f"prompts.file={prompts_file}", *overrides])
    RunFolder(cfg).clear()
    sim = prompt_s is not None
    if sim:   # set before Ray starts: its raylet and workers inherit it
        os.environ[SIM_ENV] = _sim_env(cfg, out_p, prompt_s, image_bytes)
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sa-gen-", dir="/tmp")   # a Ray of its own
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(0.5):
            samples.append((time.time(), _rss_mb()))
    try:
        connect(address if not sim else None, num_cpus=2 if sim else None, dashboard=False)
        before = peak_rss_mb()
        threading.Thread(target=sample, daemon=True).start()
        t0 = time.time()
        manifest = run_generate(cfg, swap=SIM_STAGES if sim else None)
        seconds = time.time() - t0
        stop.set()
    finally:
        if sim:
            import ray
            ray.shutdown()
            shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    step = max(1, len(samples) // 12)
    t = manifest["timings_s"]   # the run's phases, from its own clock: prepare, then the stream, then finalize
    ends = {"prepare": t0 + t["prepare"], "stream": t0 + t["prepare"] + t["stream"], "finalize": float("inf")}
    phase = {k: max([r for s, r in samples if s <= ends[k] and (k == "prepare" or s > prev)], default=None)
             for prev, k in zip([0.0, ends["prepare"], ends["stream"]], ends)}
    return {"mode": "sim" if sim else "real", "prompts": manifest["counts"].get("prompts"),
            "questions": manifest["counts"]["questions"], "pairs": manifest["counts"]["pairs"],
            "seconds": round(seconds, 1), "stream_seconds": manifest["timings_s"]["stream"],
            "finalize_seconds": manifest["timings_s"]["finalize"], "peak_rss_mb": peak_rss_mb(),
            "peak_rss_before_run_mb": before, "rss_trace_mb": [r for _, r in samples[::step]],
            "max_rss_by_phase_mb": phase, "prompt_s": prompt_s,
            "overrides": list(overrides)}


def bench_generation(work: Path, tiny: Path, sizes=(2000, 20000), mode: str = "sim", prompt_s: float = 0.005,
                     overrides=()) -> dict:
    """Driver memory of generation at each size (its own subprocess); the run folders are removed once measured.
    `overrides`: config --set items (the sim's larger shards: tiny.yaml writes 8 rows a shard, a Ray task each)."""
    import ray

    from pipelines.models.tiny import make_tiny
    make_tiny(tiny)   # here, not in the first child: building them would count in its peak
    address = ray.get_runtime_context().gcs_address if mode == "real" else None
    runs = []
    for n in sizes:
        run = work / f"gen-{mode}-{n}"
        shutil.rmtree(run, ignore_errors=True)
        prompts = write_prompts_file(run / "prompts.jsonl", n)
        runs.append(run_child("generation-child", {"tiny": str(tiny), "out": str(run), "prompts_file": str(prompts),
                                                    "address": address,
                                                    "prompt_s": prompt_s if mode == "sim" else None,
                                                    "overrides": list(overrides)},
                              env={"RAY_ADDRESS": ""} if mode == "sim" else None))
        shutil.rmtree(run, ignore_errors=True)
    small, big = runs[0], runs[-1]
    return {"mode": mode, "overrides": list(overrides), "runs": runs, "prompts_ratio": round(big["questions"] / max(1, small["questions"]), 2),
            "rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3), "load_avg_after": load_avg()}
