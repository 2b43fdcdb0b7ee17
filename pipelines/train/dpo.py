"""The TRL and PEFT arguments of a recipe, made in one place for the Ray Train workers and the benchmark."""
from __future__ import annotations

from pipelines.train.config import TrainConfig

PROJECTOR = "multi_modal_projector"   # LLaVA's vision-language projector (transformers' module name)


def dpo_args(cfg: TrainConfig, output_dir: str, deepspeed: dict | None = None, world_size: int = 1, **extra):
    """TRL's DPOConfig for the recipe; `extra` carries what the process set-up decides (backend, use_cpu)."""
    from trl import DPOConfig
    return DPOConfig(
        output_dir=output_dir, beta=cfg.beta, learning_rate=cfg.learning_rate,
        loss_type=[cfg.loss_type] + (["sft"] if cfg.sft_weight else []),
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio,  # < 1: a ratio
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.accumulation_steps(world_size), bf16=cfg.bf16, fp16=False,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        seed=cfg.seed, report_to=[r for r in cfg.report_to if r != "none"] or "none",
        deepspeed=deepspeed, optim=cfg.optim, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=None,                 # never truncate: rows over cfg.max_length are dropped before
        precompute_ref_log_probs=False,  # rejected by TRL for vision datasets
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, **extra)


def lora_config(cfg: TrainConfig):
    """PEFT's LoRA for the recipe: only the language model's layers when scoped (PEFT takes a regex string as a
    full match of the module name), the projector trained whole beside it when it has a learning rate."""
    from peft import LoraConfig
    targets = list(cfg.lora.target_modules)
    if cfg.lora.scope == "language_model":
        targets = rf".*language_model\..*\.(?:{'|'.join(targets)})"
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
                      modules_to_save=[PROJECTOR] if cfg.projector_lr else None, task_type="CAUSAL_LM")


def trainer_class(cfg: TrainConfig):
    """TRL's DPOTrainer, with the projector's parameters in an optimizer group of their own learning rate."""
    from trl import DPOTrainer
    if not cfg.projector_lr:
        return DPOTrainer

    class DPOTrainerWithProjectorLr(DPOTrainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = model or self.model
                decay = set(self.get_decay_parameter_names(model))
                groups: dict[tuple, list] = {}
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        key = (cfg.projector_lr if PROJECTOR in name else self.args.learning_rate,
                               self.args.weight_decay if name in decay else 0.0)
                        groups.setdefault(key, []).append(p)
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                kwargs.pop("lr", None)
                self.optimizer = cls([{"params": ps, "lr": lr, "weight_decay": wd}
                                      for (lr, wd), ps in groups.items()], **kwargs)
            return super().create_optimizer(model)
    return DPOTrainerWithProjectorLr
