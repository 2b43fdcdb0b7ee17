"""What each Ray Train worker runs for `pipelines.train.job.run_train`: TRL DPOTrainer + PEFT LoRA (+ DeepSpeed).

Checkpoints go to Ray Train through `RayTrainReportCallback` (Ray uploads them to its storage_path, local or
object storage); a restarted worker group (FailureConfig) or a rerun on the same output_dir resumes from
`ray.train.get_checkpoint()`. Each node builds the records in its own scratch folder; rank 0 writes
metrics.jsonl, TensorBoard events, the adapter, the merged model and summary.json to the output location
(see pipelines.train.outputs). No node needs a disk it shares with another.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from actors.common.runtime import peak_rss_mb
from cluster.storage import local_folder
from pipelines.train.dpo import PROJECTOR, dpo_args, lora_config, trainer_class
from pipelines.train.outputs import (
    MetricsLog,
    RunOutputs,
    is_node_builder,
    node_id,
    node_records,
    remove_node_scratch,
)

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


def _callbacks(outputs: RunOutputs, metrics: MetricsLog, start_step: int, fail_at_step: int | None):
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """Rank 0 logs one JSON line per logged step (lines past the resumed step are dropped first); at each
        checkpoint the metrics and TensorBoard events reach the output location too."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                metrics.start(start_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            metrics.add({"step": state.global_step, **{k: float(logs[k]) for k in METRIC_KEYS if k in logs}})

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                metrics.flush()
                outputs.publish("tb")

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

    cfg, ds_config, run_id = config["cfg"], config["deepspeed"], config["run_id"]
    torch.set_num_threads(cfg.workers.threads)
    use_cuda = torch.cuda.is_available() and cfg.workers.use_gpu
    extra = _setup_distributed_state(ds_config is not None, use_cuda)

    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    nodes = _gather(node_id())
    builder = is_node_builder(rank, nodes)
    # HF checkpoints before Ray uploads them, and rank 0's results before they reach object storage
    work_dir = Path(tempfile.mkdtemp(prefix=f"dpo-rank{rank}-"))
    outputs = RunOutputs(config["paths"], work_dir)
    metrics = MetricsLog(outputs.loc["metrics"])
    try:
        if "tensorboard" in cfg.report_to:
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(outputs.local("tb"))
        processor = AutoProcessor.from_pretrained(cfg.model)
        train_ds, dropped, records_bytes = node_records(config["files"], cfg, processor, run_id, builder)
        if not len(train_ds):
            raise ValueError(f"no trainable pairs rows (dropped: {dropped})")
        args = dpo_args(cfg, str(work_dir / "hf"), ds_config, world_size=ctx.get_world_size(), **extra)
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
        peft_config = lora_config(cfg)
        init_checksum = None
        if cfg.init_adapter:   # a later round continues the adapter of the round before
            from peft import PeftModel
            init_adapter = local_folder(cfg.init_adapter, work_dir / "init_adapter")
            model, peft_config = PeftModel.from_pretrained(model, init_adapter, is_trainable=True), None
            # what training starts from, for the record (0 under ZeRO-3, whose weights are partitioned on load)
            init_checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)

        ckpt = ray.train.get_checkpoint()
        with (ckpt.as_directory() if ckpt else contextlib.nullcontext()) as ckpt_root:
            resume_from = str(Path(ckpt_root) / RayTrainReportCallback.CHECKPOINT_NAME) if ckpt_root else None
            start_step = _checkpoint_step(resume_from) if resume_from else 0
            trainer = trainer_class(cfg)(model=model, args=args, train_dataset=train_ds, processing_class=processor,
                                 peft_config=peft_config,
                                 callbacks=_callbacks(outputs, metrics, start_step, config.get("fail_at_step")))
            if cfg.init_adapter and cfg.reference == "base":
                # TRL keeps a frozen copy of a starting adapter ("ref") as the reference; without it the reference
                # is the model with its adapters disabled: the base.
                trainer.model.delete_adapter("ref")
            trainer.train(resume_from_checkpoint=resume_from)
        if "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter("ref")   # the saved adapter is the policy's alone

        # Every rank takes part (ZeRO-3 gathers the adapter; the checksums are a collective); rank 0 writes.
        adapter = outputs.local("adapter") if rank == 0 else work_dir / "adapter"
        trainer.save_model(str(adapter))
        checksums = _replica_checksums(trainer, ds_config)
        peak_rss = _gather(peak_rss_mb())
        memory.sample()
        peak_anon = _gather(round(memory.peak, 1))
        if trainer.is_world_process_zero():
            processor.save_pretrained(adapter)
            outputs.publish("adapter")
            trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
            if cfg.merge_adapter:
                _merge(cfg, adapter, outputs.local("merged"), dtype)
                outputs.publish("merged")
            metrics.flush()
            outputs.publish("tb")
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            outputs.write_json("summary", {
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
                "peak_rss_mb_by_rank": peak_rss, "peak_anon_mb_by_rank": peak_anon, "nodes": len(set(nodes)),
                "records_mb": round(records_bytes / 2**20, 3),
            })
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        remove_node_scratch(run_id, builder)


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


def _merge(cfg, adapter: Path, merged_dir: Path, dtype) -> None:
    """Reload the base model, apply the saved adapter, merge and save (works whatever ZeRO stage trained it)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    # Under ZeRO-3 from_pretrained would partition the weights with a collective only this rank joins (hang).
    unset_hf_deepspeed_config()
    base = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(merged_dir))
    AutoProcessor.from_pretrained(str(adapter)).save_pretrained(str(merged_dir))
    # In the hub's weight names, which vLLM's LLaVA loader needs (an on-policy round samples from this model).
    from pipelines.models.tiny import to_hub_layout
    to_hub_layout(merged_dir)
