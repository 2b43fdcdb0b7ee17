"""The TRL and PEFT arguments of a recipe, made in one place for the Ray Train workers and the benchmark."""
from __future__ import annotations

from pipelines.train.config import TrainConfig


def dpo_args(cfg: TrainConfig, output_dir: str, deepspeed: dict | None = None, **extra):
    """TRL's DPOConfig for the recipe; `extra` carries what the process set-up decides (backend, use_cpu)."""
    from trl import DPOConfig
    return DPOConfig(
        output_dir=output_dir, beta=cfg.beta, learning_rate=cfg.learning_rate,
        loss_type=[cfg.loss_type] + (["sft"] if cfg.sft_weight else []),
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio,  # < 1: a ratio
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, bf16=cfg.bf16, fp16=False,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        seed=cfg.seed, report_to=[r for r in cfg.report_to if r != "none"] or "none",
        deepspeed=deepspeed, optim=cfg.optim, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=None,                 # never truncate: rows over cfg.max_length are dropped before
        precompute_ref_log_probs=False,  # rejected by TRL for vision datasets
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, **extra)


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
