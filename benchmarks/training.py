"""Training: Ray Train DPO step time against plain TRL's DPOTrainer on the same tiny model and records."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from benchmarks.meter import load_avg, median
from benchmarks.streaming import tiny_run_config


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


def _plain_trl(tcfg, table, out: Path) -> list[float]:
    """TRL's DPOTrainer in this process, with the recipe's arguments as the workers make them."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOTrainer

    from pipelines.train.data import hf_dataset, to_trl_records
    from pipelines.train.dpo import dpo_args, lora_config
    torch.set_num_threads(tcfg.workers.threads)
    rows = [{k: v for k, v in r.items() if k != "pair_id"} for r in to_trl_records(table.sort_by("pair_id"))]
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")
    model = AutoModelForImageTextToText.from_pretrained(tcfg.model, dtype=torch.float32)
    DPOTrainer(model=model, args=dpo_args(tcfg, str(out / "hf"), use_cpu=True), train_dataset=hf_dataset(rows),
               peft_config=lora_config(tcfg), processing_class=AutoProcessor.from_pretrained(tcfg.model)).train()
    return _step_seconds(out / "tb")


def bench_training(work: Path, tiny: Path, steps: int = 30, data_prompts: int = 32) -> dict:
    """Same model, data, LoRA and batch: 1 Ray Train worker (no DeepSpeed) vs the trainer in this process."""
    import dataclasses

    import pyarrow.dataset as pads

    from cluster.resources import WorkersConfig
    from pipelines.generate.job import run_generate
    from pipelines.train.job import run_train
    cfg = tiny_run_config(work / "train-data", tiny, data_prompts)
    if not (Path(cfg.output_dir) / "pairs").is_dir():
        run_generate(cfg)
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
    ray_s, plain_s = median(ray_steps), median(plain_steps)
    return {"steps": steps, "batch_size": tcfg.per_device_batch_size, "ray_train_step_s": round(ray_s, 4),
            "plain_trl_step_s": round(plain_s, 4), "ratio": round(ray_s / plain_s, 3),
            "ray_train_wall_s": round(ray_wall, 1), "plain_trl_wall_s": round(plain_wall, 1),
            "load_avg_after": load_avg()}
