"""`synthalign bench`: is the pipeline worth its machinery? (issue 7)

streaming  `generate` vs the same stage classes in a plain in-process loop, same prompts and batch sizes
scaling    two sizes (2K-vs-9K proportions), one driver subprocess each: wall-time and driver peak-RSS ratios
training   Ray Train DPO step time vs plain TRL DPOTrainer on the same tiny model and records
cluster    a simulated GPU cluster running the real Ray Data chain on sleep stand-ins (pipelines/bench_sim.py)

Library code: the caller connects Ray (the CLI does); the cluster simulation starts its own in a subprocess.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
SYNONYMS = REPO.parent / "shared" / "data" / "objhal" / "synonyms_refine.txt"


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class CpuMeter:
    """CPU seconds used by this process and all its descendants (a local Ray's raylet, workers...) while
    active, sampled every `every` s so that processes which exit early still count up to their last sample."""

    def __init__(self, every: float = 0.5):
        import threading
        self.every, self.seen, self.stop, self.started = every, {}, threading.Event(), False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        import psutil
        me = psutil.Process()
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times()
                first = t.user + t.system if not self.started else 0.0  # a new process counts from 0
                # The name is read each time: a Ray worker renames itself (ray::MapWorker(...)) once it runs.
                self.seen.setdefault(p.pid, [first, 0.0, ""])[1:] = [t.user + t.system,
                                                                     (p.cmdline() or [p.name()])[0][:48]]
            except psutil.Error:
                pass

    def _run(self):
        while not self.stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._sample()
        self.started = True
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._sample()
        self.by_name = {}
        for first, last, name in self.seen.values():
            self.by_name[name] = self.by_name.get(name, 0.0) + max(0.0, last - first)
        self.seconds = sum(self.by_name.values())
        self.processes = len(self.seen)


def tiny_run_config(out: Path, tiny: Path, n_prompts: int, overrides=()):
    """configs/tiny.yaml at n_prompts, pointed at the tiny models under `tiny` and output under `out`."""
    from actors.tiny import make_tiny
    from pipelines.config import load_config
    models = make_tiny(tiny)
    sets = [f"output_dir={out}", "tiny_models=null", f"prompts.num_prompts={n_prompts}",
            f"images.model={models['sd']}", f"selection.model={models['clip']}",
            f"rewards.text_model={models['reward']}", f"rewards.clip_model={models['clip']}",
            f"train.model={models['llava']}"]
    if SYNONYMS.exists():
        sets.append(f"rewards.synonyms_file={SYNONYMS}")
    cfg = load_config(TINY_CONFIG, sets + list(overrides))
    for s, name in zip(cfg.samplers, ("llava", "llava-b")):
        s.model = str(models[name])
    return cfg


# ---------------------------------------------------------------- 1. streaming efficiency

def run_loop(cfg, rows, vocab, out: Path) -> dict:
    """The baseline: every stage class called in one process, chunk by chunk, with the pools' batch sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.images import ImageSynthesis
    from actors.pairs import PairBuilder
    from actors.prompts import QuestionExpander
    from actors.rewards import RewardScorer
    from actors.sampling import AnswerSampler
    from actors.select import ImageSelection
    from pipelines.generate import prompt_table
    from pipelines.outputs import finalize
    t0 = time.time()
    p = {name: cfg.pool(name) for name in ("images", "selection", "rewards")}
    images = ImageSynthesis(cfg.images, threads=p["images"].threads)
    select = ImageSelection(cfg.selection, threads=p["selection"].threads)
    samplers = [(AnswerSampler(s, threads=cfg.pool("sampling", s).threads), cfg.pool("sampling", s).batch_size)
                for s in cfg.samplers]
    rewards = RewardScorer(cfg.rewards, vocab, threads=p["rewards"].threads)
    pairs, expand = PairBuilder(cfg.pairs), QuestionExpander()
    t_load = time.time() - t0

    def each(table, fn, size):
        parts = [fn(table.slice(i, size)) for i in range(0, table.num_rows, size)]
        return pa.concat_tables(parts, promote_options="permissive") if parts else table

    table, done = prompt_table(rows), []
    chunk = max(p["images"].batch_size, p["selection"].batch_size)
    for i in range(0, table.num_rows, chunk):
        x = each(table.slice(i, chunk), images, p["images"].batch_size)
        x = expand(each(x, select, p["selection"].batch_size))
        for sampler, size in samplers:
            x = each(x, sampler, size)
        done.append(each(each(x, rewards, p["rewards"].batch_size), pairs, cfg.rows_per_shard))
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
    from pipelines.generate import prepare, run_generate
    cfg = tiny_run_config(work / "stream-pipeline", tiny, n_prompts, overrides)
    rows, vocab, _ = prepare(cfg, overwrite=True)
    load0 = load_avg()
    with CpuMeter() as loop_cpu:
        loop = run_loop(cfg, rows, vocab, work / "stream-loop")
    t0 = time.time()
    with CpuMeter() as pipe_cpu:
        manifest = run_generate(cfg, overwrite=True, prepared=(rows, vocab, Path(cfg.output_dir)))
    pipe_s = time.time() - t0
    same = _pair_set(work / "stream-loop" / "pairs") == _pair_set(Path(cfg.output_dir) / "pairs")
    return {"prompts": n_prompts, "loop_seconds": round(loop["seconds"], 2),
            "loop_load_seconds": round(loop["load_seconds"], 2), "pipeline_seconds": round(pipe_s, 2),
            "pipeline_timings": manifest["timings_s"],
            "loop_prompts_per_s": round(n_prompts / loop["seconds"], 3),
            "pipeline_prompts_per_s": round(n_prompts / pipe_s, 3),
            "ratio": round(loop["seconds"] / pipe_s, 3), "target_ratio": 1.5,
            "loop_cpu_seconds": round(loop_cpu.seconds, 1), "pipeline_cpu_seconds": round(pipe_cpu.seconds, 1),
            "pipeline_cpu_by_process": {k: round(v, 1) for k, v in sorted(pipe_cpu.by_name.items(),
                                                                           key=lambda kv: -kv[1]) if v >= 0.5},
            "pairs": manifest["counts"]["pairs"], "loop_pairs": loop["pairs"], "same_pairs": same,
            "load_avg_before": load0, "load_avg_after": load_avg()}


# ---------------------------------------------------------------- 2. scaling (one driver subprocess per size)

def _scaling_child(address: str, tiny: str, out: str, n_prompts: int) -> dict:
    from cluster.connect import connect
    from pipelines.generate import run_generate
    connect(address)
    cfg = tiny_run_config(Path(out), Path(tiny), n_prompts)
    t0 = time.time()
    manifest = run_generate(cfg, overwrite=True)
    return {"prompts": n_prompts, "seconds": round(time.time() - t0, 2), "pairs": manifest["counts"]["pairs"],
            "stream_seconds": manifest["timings_s"]["stream"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _child(kind: str, args: dict, env=None) -> dict:
    """Run `python -m pipelines.bench KIND JSON` and return the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.bench", kind, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench {kind} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def bench_scaling(work: Path, tiny: Path, sizes=(500, 2250)) -> dict:
    import ray
    address = ray.get_runtime_context().gcs_address
    runs = [_child("scaling-child", {"address": address, "tiny": str(tiny), "out": str(work / f"scale-{n}"),
                                     "n_prompts": n}) for n in sizes]
    small, big = runs[0], runs[-1]
    return {"runs": runs, "work_ratio": round(big["prompts"] / small["prompts"], 3),
            "wall_ratio": round(big["seconds"] / small["seconds"], 3),
            "rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "target_wall_ratio": 4.7, "target_rss_ratio": 1.1, "load_avg_after": load_avg()}


# ---------------------------------------------------------------- 3. training: Ray Train vs plain TRL

def _step_seconds(tb_dir: Path) -> list[float]:
    """Seconds between consecutive logged steps (logging_steps=1), from TensorBoard's event wall times."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    times: dict[int, float] = {}
    for f in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            times.update({e.step: e.wall_time for e in acc.Scalars("train/loss")})
    steps = sorted(times)
    return [times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1]


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _plain_trl(tcfg, table, out: Path) -> list[float]:
    """TRL's DPOTrainer in this process, with the worker's settings (pipelines/train_worker.py)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from pipelines.train import to_trl_records
    from pipelines.train_worker import _hf_dataset
    torch.set_num_threads(tcfg.workers.threads)
    rows = [{k: v for k, v in r.items() if k != "pair_id"} for r in to_trl_records(table.sort_by("pair_id"))]
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")
    args = DPOConfig(output_dir=str(out / "hf"), beta=tcfg.beta, loss_type=[tcfg.loss_type],
                     learning_rate=tcfg.learning_rate, lr_scheduler_type=tcfg.lr_scheduler_type,
                     warmup_steps=tcfg.warmup_ratio, max_steps=tcfg.max_steps,
                     per_device_train_batch_size=tcfg.per_device_batch_size, logging_steps=1,
                     save_strategy="steps", save_steps=tcfg.save_steps, seed=tcfg.seed, report_to="tensorboard",
                     optim=tcfg.optim, gradient_checkpointing=tcfg.gradient_checkpointing, max_length=None,
                     precompute_ref_log_probs=False, remove_unused_columns=False, dataloader_num_workers=0,
                     disable_tqdm=True, use_cpu=True)
    model = AutoModelForImageTextToText.from_pretrained(tcfg.model, dtype=torch.float32)
    lora = LoraConfig(r=tcfg.lora.r, lora_alpha=tcfg.lora.alpha, lora_dropout=tcfg.lora.dropout,
                      target_modules=list(tcfg.lora.target_modules), task_type="CAUSAL_LM")
    DPOTrainer(model=model, args=args, train_dataset=_hf_dataset(rows), peft_config=lora,
               processing_class=AutoProcessor.from_pretrained(tcfg.model)).train()
    return _step_seconds(out / "tb")


def bench_training(work: Path, tiny: Path, steps: int = 30, data_prompts: int = 32) -> dict:
    """Same model, data, LoRA and batch: 1 Ray Train worker (no DeepSpeed) vs the trainer in this process."""
    import dataclasses

    import pyarrow.dataset as pads

    from cluster.resources import WorkersConfig
    from pipelines.generate import run_generate
    from pipelines.train import run_train
    cfg = tiny_run_config(work / "train-data", tiny, data_prompts)
    if not (Path(cfg.output_dir) / "pairs").is_dir():
        run_generate(cfg, overwrite=True)
    pairs = Path(cfg.output_dir) / "pairs"
    tcfg = dataclasses.replace(cfg.train, deepspeed=None, max_steps=steps, save_steps=steps, logging_steps=1,
                               report_to=["tensorboard"], workers=WorkersConfig(num_workers=1, num_cpus=1))
    t0 = time.time()
    run_train(tcfg, str(pairs), str(work / "train-ray"), resume=False)
    ray_wall = time.time() - t0
    ray_steps = _step_seconds(work / "train-ray" / "train" / "tb")
    shutil.rmtree(work / "train-plain", ignore_errors=True)
    t0 = time.time()
    plain_steps = _plain_trl(tcfg, pads.dataset(str(pairs)).to_table(), work / "train-plain")
    plain_wall = time.time() - t0
    ray_s, plain_s = _median(ray_steps), _median(plain_steps)
    return {"steps": steps, "batch_size": tcfg.per_device_batch_size, "ray_train_step_s": round(ray_s, 4),
            "plain_trl_step_s": round(plain_s, 4), "ratio": round(ray_s / plain_s, 3), "target_ratio": 1.1,
            "ray_train_wall_s": round(ray_wall, 1), "plain_trl_wall_s": round(plain_wall, 1),
            "load_avg_after": load_avg()}


# ---------------------------------------------------------------- the suite

BENCHMARKS = ("streaming", "scaling", "training", "cluster")


def run_bench(out: Path, only=BENCHMARKS, tiny: Path | None = None, prompts: int = 2048, sizes=(500, 2250),
              train_steps: int = 30, sim: dict | None = None) -> dict:
    """Run the selected benchmarks (Ray must be connected for all but `cluster`); writes JSON and markdown."""
    out = Path(out)
    work, tiny = out / "work", Path(tiny or out / "tiny")
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cores": os.cpu_count(), "load_avg_start": load_avg()}}
    for name in only:
        t0 = time.time()
        if name == "streaming":
            results[name] = bench_streaming(work, tiny, prompts)
        elif name == "scaling":
            results[name] = bench_scaling(work, tiny, sizes)
        elif name == "training":
            results[name] = bench_training(work, tiny, train_steps)
        elif name == "cluster":
            from pipelines.bench_sim import bench_cluster
            results[name] = {k: bench_cluster(work / k, **{**(sim or {}), "shape": shp})
                             for k, shp in (("balanced", None), ("given", (sim or {}).get("shape")))
                             if k == "balanced" or shp}
        results[name]["bench_seconds"] = round(time.time() - t0, 1)
    results["machine"]["load_avg_end"] = load_avg()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


def markdown(r: dict) -> str:
    rows = []
    if "streaming" in r:
        s = r["streaming"]
        rows += [("streaming", f"{s['prompts']} prompts: pipeline / loop throughput", f"{s['ratio']}× "
                  f"({s['pipeline_seconds']} s vs {s['loop_seconds']} s)", "≥ 1.5×", s["ratio"] >= 1.5)]
    if "scaling" in r:
        s = r["scaling"]
        rows += [("scaling", f"wall time for {s['work_ratio']}× the work", f"{s['wall_ratio']}×", "≤ 4.7×",
                  s["wall_ratio"] <= 4.7),
                 ("scaling", "driver peak RSS", f"{s['rss_ratio']}× ({s['runs'][0]['peak_rss_mb']} → "
                  f"{s['runs'][-1]['peak_rss_mb']} MB)", "≤ 1.1×", s["rss_ratio"] <= 1.1)]
    if "training" in r:
        s = r["training"]
        rows += [("training", "Ray Train / plain TRL, median step", f"{s['ratio']}× ({s['ray_train_step_s']} s vs "
                  f"{s['plain_trl_step_s']} s)", "≤ 1.1×", s["ratio"] <= 1.1)]
    for shape, s in r.get("cluster", {}).items():
        if shape == "bench_seconds":
            continue
        busy = ", ".join(f"{k} {v['gpus']:g} GPU {v['busy']:.0%}" for k, v in s["pools"].items())
        rows += [("cluster", f"{shape} shape ({s['gpus_total']:g} GPUs), busy per pool", busy, "each ≥ 90%",
                  s["min_busy"] >= 0.9),
                 ("cluster", f"predicted wall time, {s['predict_prompts']} prompts", f"{s['predicted_hours']} h "
                  f"(ideal {s['ideal_hours']} h)", "", None)]
    lines = ["| benchmark | metric | result | target | met |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} | {'' if e is None else 'yes' if e else 'no'} |" for a, b, c, d, e in rows]
    m = r["machine"]
    return "\n".join(lines) + f"\n\n{m['cores']} cores; load average {m['load_avg_start']} → {m['load_avg_end']}\n"


if __name__ == "__main__":  # the subprocess drivers: scaling-child / cluster-child JSON
    kind, arg = sys.argv[1], json.loads(sys.argv[2])
    if kind == "scaling-child":
        result = _scaling_child(**arg)
    else:
        from pipelines.bench_sim import _cluster_child
        result = _cluster_child(arg)
    print(json.dumps(result), flush=True)
