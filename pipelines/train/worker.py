"""What each Ray Train worker runs for `pipelines.train.job.run_train`: TRL DPOTrainer + PEFT LoRA (+ DeepSpeed).

Checkpoints go to Ray Train through `RayTrainReportCallback`; a restarted worker group (FailureConfig) or a rerun
on the same output_dir resumes from `ray.train.get_checkpoint()`. Rank 0 writes metrics.jsonl, the adapter,
the merged model and summary.json straight into the output_dir, which must be on storage every node sees
(as Ray Train's own storage_path under it must be).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from actors.common.runtime import peak_rss_mb
from pipelines.train.data import build_trl_dataset, load_records
from pipelines.train.dpo import PROJECTOR, dpo_args, lora_config, trainer_class

METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "learning_rate", "grad_norm", "epoch")


def _disable_deepspeed_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op (70-140 s) at every CPU distributed init.

    `deepspeed.comm.torch.build_shm_op` only builds it when `deepspeed.ops.__compatible_ops__` marks it
    compatible; that dict is computed lazily (probing every op with the compiler) and edits to it persist. The op
    only speeds up AutoTP inference all-reduce on CPU; training collectives go through torch.distributed (gloo).
    """
    import deepspeed.ops
    ops = vars(deepspeed.ops)
    ops.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def _setup_distributed_state(use_deepspeed: bool, use_cuda: bool) -> dict:
    """Extra DPOConfig kwargs so accelerate sees the Ray-made process group (and DeepSpeed) correctly.

    With `deepspeed` set, TrainingArguments ignores `ddp_backend` and accelerate ends up with one process; a
    PartialState made first with DeepSpeed enabled in the environment, reused via `use_configured_state`, fixes it.
    """
    backend = "nccl" if use_cuda else "gloo"
    if not use_deepspeed:
        # On a machine without CUDA accelerate only treats the run as distributed (MULTI_CPU) with cpu=True;
        # without it every rank trains alone (DistributedType.NO) and the adapters silently diverge.
        return {"ddp_backend": backend} if use_cuda else {"ddp_backend": backend, "use_cpu": True}
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if not use_cuda:
        _disable_deepspeed_shm_comm()
    from accelerate import PartialState
    PartialState(backend=backend)
    return {"accelerator_config": {"use_configured_state": True}}


def _shared_dataset(files, cfg, processor, folder: Path, rank: int):
    """Rank 0 writes the TRL records to `folder` (the run's storage, which every node sees), the others wait;
    then every rank memory-maps it. No process holds the pairs in memory."""
    import torch.distributed as dist
    if rank == 0:
        build_trl_dataset(files, folder, cfg.max_length, processor)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return load_records(folder), json.loads((folder / "dropped.json").read_text())


def _callbacks(paths: dict, start_step: int, fail_at_step: int | None):
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """Rank 0 appends one JSON line per logged step; lines past the resumed step are dropped first."""

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            p = Path(paths["metrics"])
            keep = []
            if p.exists() and start_step > 0:
                keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            p.write_text("".join(ln + "\n" for ln in keep))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            line = {"step": state.global_step, **{k: float(logs[k]) for k in METRIC_KEYS if k in logs}}
            with open(paths["metrics"], "a") as f:
                f.write(json.dumps(line) + "\n")

    class FailAfterCheckpoint(TrainerCallback):
        """Test hook: raise after the checkpoint of `fail_at_step` was reported, once per starting point."""

        def on_save(self, args, state, control, **kwargs):
            if fail_at_step is not None and state.global_step == fail_at_step and start_step < fail_at_step:
                raise RuntimeError(f"injected failure after the checkpoint of step {fail_at_step}")

    from ray.train.huggingface.transformers import RayTrainReportCallback
    # Order matters: the checkpoint is reported before the injected failure.
    return [MetricsJsonl(), RayTrainReportCallback(), FailAfterCheckpoint()]


def _checkpoint_step(ckpt_dir: str) -> int:
    state = Path(ckpt_dir) / "trainer_state.json"
    return json.loads(state.read_text())["global_step"] if state.exists() else 0


def train_loop(config: dict) -> None:
    with PeakAnonymousMemory() as memory:
        _train(config, memory)


def _train(config: dict, memory: PeakAnonymousMemory) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import ray.train
    import torch

    cfg, paths, ds_config = config["cfg"], config["paths"], config["deepspeed"]
    torch.set_num_threads(cfg.workers.threads)
    use_cuda = torch.cuda.is_available() and cfg.workers.use_gpu
    extra = _setup_distributed_state(ds_config is not None, use_cuda)
    if "tensorboard" in cfg.report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = paths["tb"]

    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    processor = AutoProcessor.from_pretrained(cfg.model)
    train_ds, dropped = _shared_dataset(config["files"], cfg, processor, Path(paths["data"]), rank)
    if not len(train_ds):
        raise ValueError(f"no trainable pairs rows (dropped: {dropped})")

    work_dir = tempfile.mkdtemp(prefix=f"dpo-rank{rank}-")   # HF checkpoints before Ray copies them to storage
    try:
        args = dpo_args(cfg, work_dir, ds_config, world_size=ctx.get_world_size(), **extra)
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
        peft_config = lora_config(cfg)
        init_checksum = None
        if cfg.init_adapter:   # a later round continues the adapter of the round before
            from peft import PeftModel
            model, peft_config = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True), None
            # what training starts from, for the record (0 under ZeRO-3, whose weights are partitioned on load)
            init_checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)

        ckpt = ray.train.get_checkpoint()
        with (ckpt.as_directory() if ckpt else contextlib.nullcontext()) as ckpt_root:
            resume_from = str(Path(ckpt_root) / RayTrainReportCallback.CHECKPOINT_NAME) if ckpt_root else None
            start_step = _checkpoint_step(resume_from) if resume_from else 0
            trainer = trainer_class(cfg)(model=model, args=args, train_dataset=train_ds, processing_class=processor,
                                 peft_config=peft_config,
                                 callbacks=_callbacks(paths, start_step, config.get("fail_at_step")))
            if cfg.init_adapter and cfg.reference == "base":
                # TRL keeps a frozen copy of a starting adapter ("ref") as the reference; without it the reference
                # is the model with its adapters disabled: the base.
                trainer.model.delete_adapter("ref")
            trainer.train(resume_from_checkpoint=resume_from)
        if "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter("ref")   # the saved adapter is the policy's alone

        # Every rank takes part (ZeRO-3 gathers the adapter; the checksums are a collective); rank 0 writes.
        trainer.save_model(paths["adapter"])
        checksums = _replica_checksums(trainer, ds_config)
        peak_rss = _gather(peak_rss_mb())
        memory.sample()
        peak_anon = _gather(round(memory.peak, 1))
        if trainer.is_world_process_zero():
            processor.save_pretrained(paths["adapter"])
            trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
            if cfg.merge_adapter:
                _merge(cfg, paths, dtype)
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            Path(paths["summary"]).write_text(json.dumps({
                "steps": trainer.state.global_step, "final_loss": losses[-1] if losses else None,
                "resumed_from_step": start_step, "init_adapter": cfg.init_adapter, "init_checksum": init_checksum,
                "reference": cfg.reference if cfg.init_adapter else "base",
                "rows_used": len(train_ds), "rows_dropped": sum(dropped.values()),
                "rows_dropped_by_reason": dropped, "world_size": ctx.get_world_size(),
                "deepspeed_stage": (ds_config or {}).get("zero_optimization", {}).get("stage"),
                "trainable_tensors": len(trainable), "trainable_params": sum(
                    getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad),
                "trainable_names_all_lora": all("lora_" in n for n in trainable),
                "trainable_outside_lora": sorted({n.split(".modules_to_save")[0] for n in trainable if "lora_" not in n}),
                "trainable_in_vision_tower": sum("vision_tower" in n for n in trainable),
                "projector_trained": any(PROJECTOR in n and "lora_" not in n for n in trainable),
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
                "num_processes": trainer.accelerator.num_processes, "replica_checksums": checksums,
                "peak_rss_mb_by_rank": peak_rss, "peak_anon_mb_by_rank": peak_anon,
            }, indent=2))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


class PeakAnonymousMemory:
    """Peak anonymous RSS (MB) of this process while active, sampled: VmHWM also counts the pages of the
    memory-mapped records a worker has read, which the kernel reclaims at will."""

    def __init__(self, every: float = 0.2):
        import threading
        self.every, self.peak, self.done = every, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)
        except OSError:   # not Linux: the figure stays 0
            pass

    def _run(self) -> None:
        while not self.done.wait(self.every):
            self.sample()

    def __enter__(self):
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.sample()


def _gather(value) -> list:
    """`value` from every rank, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _replica_checksums(trainer, ds_config) -> list[float] | None:
    """Sum of the trainable weights on every rank: data-parallel replicas must agree (None under ZeRO-3)."""
    if (ds_config or {}).get("zero_optimization", {}).get("stage") == 3:
        return None
    local = sum(float(p.detach().double().sum()) for p in trainer.model.parameters() if p.requires_grad)
    return _gather(local)


def _merge(cfg, paths: dict, dtype) -> None:
    """Reload the base model, apply the saved adapter, merge and save (works whatever ZeRO stage trained it)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    # Under ZeRO-3 from_pretrained would partition the weights with a collective only this rank joins (hang).
    unset_hf_deepspeed_config()
    base = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, paths["adapter"]).merge_and_unload()
    merged.save_pretrained(paths["merged"])
    AutoProcessor.from_pretrained(paths["adapter"]).save_pretrained(paths["merged"])
    # In the hub's weight names, which vLLM's LLaVA loader needs (an on-policy round samples from this model).
    from pipelines.models.tiny import to_hub_layout
    to_hub_layout(paths["merged"])
