"""DPO post-training on Ray Train (TRL DPOTrainer + PEFT LoRA + optional DeepSpeed). Owned by the training work."""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.resources import WorkersConfig


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    model: str = ""                   # base VLM: hub id or local path
    data: str | None = None           # pairs Parquet folder; default {output_dir}/pairs
    lora: LoraConfig = field(default_factory=LoraConfig)
    beta: float = 0.1
    loss_type: str = "sigmoid"
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    num_train_epochs: float = 2.0
    max_steps: int = -1
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    deepspeed: str | None = None      # e.g. configs/deepspeed/zero2.json
    bf16: bool = False
    save_steps: int = 50
    logging_steps: int = 1
    num_to_keep: int = 2
    max_failures: int = 0
    merge_adapter: bool = False
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    seed: int = 0
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def validate(self) -> list[str]:
        errs = self.workers.validate("train.workers")
        if self.learning_rate <= 0:
            errs.append("train.learning_rate: must be > 0")
        return errs
