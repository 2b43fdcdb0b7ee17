"""The TRL and PEFT arguments of a recipe, made in one place for the Ray Train workers and the benchmark."""
from __future__ import annotations

from pipelines.train.config import MIRRORED, TrainConfig

PROJECTOR = "multi_modal_projector"   # LLaVA's vision-language projector (transformers' module name)
# What the worker picks unless `train.dpo` says otherwise: the records are memory-mapped, the logs are lines.
DPO_DEFAULTS = {"dataloader_num_workers": 0, "disable_tqdm": True}


def loss_args(cfg: TrainConfig) -> dict:
    """The loss list: train.loss_type (+ "sft" at train.sft_weight), or train.dpo's loss_type / loss_weights."""
    if cfg.sft_weight:
        return {"loss_type": [cfg.loss_type, "sft"], "loss_weights": [1.0, cfg.sft_weight]}
    return {"loss_type": cfg.dpo.get("loss_type", [cfg.loss_type]), "loss_weights": cfg.dpo.get("loss_weights")}


def dpo_args(cfg: TrainConfig, output_dir: str, deepspeed: dict | None = None, world_size: int = 1, **extra):
    """TRL's DPOConfig for the recipe: `train.dpo` as is, the fields TrainConfig mirrors (MIRRORED), what the
    recipe derives; `extra` carries what the process set-up decides (backend, use_cpu)."""
    from trl import DPOConfig
    mirrored = {trl: getattr(cfg, ours) for ours, trl in MIRRORED.items()}
    return DPOConfig(**DPO_DEFAULTS | cfg.dpo | mirrored | loss_args(cfg) | dict(
        output_dir=output_dir, warmup_steps=cfg.warmup_ratio,  # < 1: a ratio
        gradient_accumulation_steps=cfg.accumulation_steps(world_size), fp16=False,
        save_strategy="steps", save_total_limit=1,   # Ray Train keeps train.num_to_keep checkpoints
        report_to=[r for r in cfg.report_to if r != "none"] or "none", deepspeed=deepspeed,
        max_length=None,                 # never truncate: rows over cfg.max_length are dropped before
        precompute_ref_log_probs=False,  # rejected by TRL for vision datasets
        remove_unused_columns=False) | extra)


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
