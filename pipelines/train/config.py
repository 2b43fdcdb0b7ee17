"""The training recipe (`train:` in a run config): DPO, LoRA, schedule, DeepSpeed, the worker group."""
from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.common.errors import InputError, Problem
from actors.common.files import read_user_text
from cluster.resources import WorkersConfig
from pipelines.typed import ConfigTypeError
from pipelines.typed import _convert as convert_value

REPO_ROOT = Path(__file__).resolve().parents[2]
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")

# The one mapping of TrainConfig fields that are DPOConfig fields (ours -> TRL's): pipelines.train.dpo hands them
# over, and `train.dpo` refuses the TRL names so that each setting has one place.
MIRRORED = {
    "beta": "beta", "learning_rate": "learning_rate", "lr_scheduler_type": "lr_scheduler_type",
    "num_train_epochs": "num_train_epochs", "max_steps": "max_steps",
    "per_device_batch_size": "per_device_train_batch_size", "bf16": "bf16", "logging_steps": "logging_steps",
    "save_steps": "save_steps", "seed": "seed", "optim": "optim", "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "gradient_checkpointing": "gradient_checkpointing",
}
# DPOConfig fields derived from the recipe or set by the worker: `train.dpo` refuses them, saying what to use.
SET_BY_US = {
    "output_dir": "set by the run: results go under <output_dir>/train",
    "warmup_steps": "use train.warmup_ratio",
    "gradient_accumulation_steps": "use train.gradient_accumulation_steps or train.global_batch_size",
    "report_to": "use train.report_to",
    "deepspeed": "use train.deepspeed",
    "max_length": "use train.max_length (longer rows are dropped, never truncated: truncation can cut image tokens)",
    "fp16": "use train.bf16",
    "save_strategy": "use train.save_steps",
    "save_total_limit": "use train.num_to_keep (Ray Train keeps the checkpoints)",
    "resume_from_checkpoint": "set by the worker: a rerun resumes from Ray Train's latest checkpoint",
    "precompute_ref_log_probs": "set by the worker: TRL refuses it for vision datasets",
    "remove_unused_columns": "set by the worker: the vision collator needs the image column",
    "ddp_backend": "set by the worker for Ray Train's process group (use train.workers)",
    "use_cpu": "set by the worker for Ray Train's process group (use train.workers.use_gpu)",
    "accelerator_config": "set by the worker for Ray Train's process group (use train.workers)",
    "local_rank": "set by Ray Train",
}


@dataclass
class LoraConfig:
    r: int = 8                        # LoRA rank (the paper: 128)
    alpha: int = 16                   # LoRA alpha (the paper: 256)
    dropout: float = 0.05             # LoRA dropout
    # Module names LoRA wraps.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Where target_modules apply: "language_model" (as LLaVA's DPO code: the vision tower stays frozen; PEFT
    # alone matches name suffixes, and the CLIP tower has q_proj/k_proj/v_proj too) or "all".
    scope: str = "language_model"

    def validate(self, name: str = "train.lora") -> list[Problem]:
        errs = []
        if self.r < 1:
            errs.append(Problem(f"{name}.r", "must be >= 1"))
        if self.alpha <= 0:
            errs.append(Problem(f"{name}.alpha", "must be > 0"))
        if not 0 <= self.dropout < 1:
            errs.append(Problem(f"{name}.dropout", "must be in [0, 1)"))
        if not self.target_modules:
            errs.append(Problem(f"{name}.target_modules", "must name at least one module"))
        if "lm_head" in self.target_modules:
            errs.append(Problem(f"{name}.target_modules", "'lm_head' is not supported by TRL's DPOTrainer"))
        if self.scope not in ("language_model", "all"):
            errs.append(Problem(f"{name}.scope", "must be 'language_model' or 'all'"))
        return errs


@dataclass
class TrainConfig:
    model: str = ""                   # base VLM: hub id or local path
    data: str | None = None           # pairs Parquet folder; default {output_dir}/pairs
    # Continue this PEFT adapter instead of a fresh LoRA (a later round of `rounds: N` sets it to the round
    # before's). The DPO reference is then the model with that adapter as it starts ("previous") or the base.
    init_adapter: str | None = None
    reference: str = "previous"        # previous | base: the DPO reference when init_adapter is set (above)
    lora: LoraConfig = field(default_factory=LoraConfig)
    beta: float = 0.1                 # DPO's beta: how far the policy may move from the reference
    loss_type: str = "sigmoid"         # TRL's DPO loss; sigmoid is the paper's
    # > 0 adds the NLL of the chosen answers with this weight (RPO, Pang et al. 2024). DPO alone may lower the
    # likelihood of chosen and rejected alike; on one-word answers the mass then drifts to junk tokens.
    sft_weight: float = 0.0
    learning_rate: float = 1e-5       # of the LoRA weights
    lr_scheduler_type: str = "cosine"  # transformers' scheduler names
    warmup_ratio: float = 0.03        # share of the steps the learning rate warms up over
    num_train_epochs: float = 2.0     # passes over the pairs
    max_steps: int = -1               # > 0: stop after this many optimizer steps (overrides epochs)
    per_device_batch_size: int = 1    # pairs per worker per forward pass
    gradient_accumulation_steps: int = 1  # forward passes per optimizer step (see global_batch_size)
    # The recipe's global batch (pairs per optimizer step), kept whatever the worker count: accumulation is
    # global / (per_device_batch_size x workers). None: per_device x accumulation x workers.
    global_batch_size: int | None = None
    # Train the vision-language projector (fully, beside the LoRA) at this learning rate, as LLaVA's DPO code
    # does with mm_projector_lr; None keeps it frozen.
    projector_lr: float | None = None
    deepspeed: str | None = None      # e.g. configs/deepspeed/zero2.json
    bf16: bool = False                # bfloat16 mixed precision (GPU; CPUs with bf16 support)
    save_steps: int = 50              # checkpoint every this many steps: what a lost worker costs to redo
    logging_steps: int = 1            # metrics every this many steps
    num_to_keep: int = 2              # checkpoints Ray Train keeps
    # Restarts of the worker group from the latest checkpoint after a worker or its node is lost (-1: forever).
    max_failures: int = 3
    merge_adapter: bool = False       # also save the base with the adapter merged in (train/merged)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none
    seed: int = 0                     # data order and LoRA initialisation
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    # Rows whose prompt (image tokens included) plus the longer answer exceed this many tokens are dropped and
    # counted, never truncated: truncation can cut image tokens. None keeps every row.
    max_length: int | None = None
    gradient_checkpointing: bool = True  # recompute activations in the backward pass: less memory, more time
    optim: str = "adamw_torch"        # torch AdamW: DeepSpeed's fused/CPU Adam compile for minutes on first use
    weight_decay: float = 0.0         # AdamW's
    max_grad_norm: float = 1.0        # gradient clipping
    # Any other field of TRL's DPOConfig, handed to it as is (checked against its fields on load), e.g.
    # `{loss_type: [sigmoid, bco_pair], loss_weights: [1.0, 0.5]}`; not the fields above or SET_BY_US.
    dpo: dict[str, Any] = field(default_factory=dict)

    def accumulation_steps(self, world_size: int) -> int:
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        return max(1, self.global_batch_size // (self.per_device_batch_size * world_size))

    def validate(self) -> list[Problem]:
        errs = self.workers.validate("train.workers")
        per_step = self.per_device_batch_size * self.workers.num_workers
        if self.global_batch_size is not None and (self.global_batch_size < 1 or self.global_batch_size % per_step):
            errs.append(Problem("train.global_batch_size", f"must be a multiple of per_device_batch_size x "
                                f"workers.num_workers = {per_step}, got {self.global_batch_size}"))
        if self.reference not in ("previous", "base"):
            errs.append(Problem("train.reference", "must be 'previous' (the policy the round starts from) or 'base'"))
        if self.projector_lr is not None and self.projector_lr <= 0:
            errs.append(Problem("train.projector_lr", "must be > 0 or null"))
        errs += self.lora.validate("train.lora")
        if self.learning_rate <= 0:
            errs.append(Problem("train.learning_rate", "must be > 0"))
        if self.beta <= 0:
            errs.append(Problem("train.beta", "must be > 0"))
        if self.sft_weight < 0:
            errs.append(Problem("train.sft_weight", "must be >= 0"))
        if not 0 <= self.warmup_ratio < 1:
            errs.append(Problem("train.warmup_ratio", "must be in [0, 1)"))
        if self.max_steps == 0 or self.max_steps < -1:
            errs.append(Problem("train.max_steps", "must be -1 (use num_train_epochs) or >= 1"))
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            errs.append(Problem("train.num_train_epochs", "must be > 0 when max_steps is -1"))
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps",
                     "num_to_keep"):
            if getattr(self, name) < 1:
                errs.append(Problem(f"train.{name}", "must be >= 1"))
        if self.max_failures < -1:
            errs.append(Problem("train.max_failures", "must be >= -1 (-1 retries forever)"))
        if self.max_length is not None and self.max_length < 1:
            errs.append(Problem("train.max_length", "must be >= 1 or null"))
        bad = [r for r in self.report_to if r not in REPORT_TO]
        if bad:
            errs.append(Problem("train.report_to", f"unknown {bad} (known: {', '.join(REPORT_TO)})"))
        if self.deepspeed is not None:
            try:
                load_deepspeed_config(self.deepspeed)
            except (OSError, ValueError, InputError) as e:
                errs.append(Problem("train.deepspeed", f"{e}"))
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            errs.append(Problem("train.weight_decay", "weight_decay and max_grad_norm must be >= 0"))
        return errs + dpo_problems(self)


def resolve_deepspeed_path(path: str) -> Path:
    """An absolute path, a path relative to the working directory, or one relative to the repository."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def load_deepspeed_config(path: str) -> dict:
    """Read a DeepSpeed JSON; the dict (not the path) goes to the workers so other nodes need no file."""
    p = resolve_deepspeed_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no DeepSpeed config at {p}")
    text = read_user_text(p, "DeepSpeed config", rows=False)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "zero_optimization" not in data:
        raise ValueError(f"{p}: expected a DeepSpeed config with a 'zero_optimization' block")
    return data


def trl_loss_types() -> list[str]:
    """The DPO loss types TRL documents on `DPOConfig.loss_type` (TRL keeps no other list of them)."""
    from trl import DPOConfig
    field_ = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type")
    return re.findall(r"`'(\w+)'`", field_.metadata["help"])


def check_with_libraries(cfg: TrainConfig) -> list[Problem]:
    """What TRL and transformers accept, asked of them (importing them costs seconds: only jobs that train)."""
    from transformers import SchedulerType
    errs = []
    known = trl_loss_types()
    if cfg.loss_type not in known:
        errs.append(Problem("train.loss_type", f"unknown {cfg.loss_type!r} (TRL knows {', '.join(known)})"))
    schedulers = [s.value for s in SchedulerType]
    if cfg.lr_scheduler_type not in schedulers:
        errs.append(Problem("train.lr_scheduler_type", f"unknown {cfg.lr_scheduler_type!r} "
                                                       f"(transformers knows {', '.join(schedulers)})"))
    if not cfg.model:   # not in validate(): generate-only configs need no train.model
        errs.append(Problem("train.model", "required (hub id or local path of the base VLM)"))
    return errs


@functools.cache
def dpo_fields() -> dict[str, Any]:
    """DPOConfig's constructor fields and their types (importing TRL costs seconds: only for a `train.dpo`)."""
    from trl import DPOConfig
    hints = typing.get_type_hints(DPOConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(DPOConfig) if f.init}


def dpo_problems(cfg: TrainConfig) -> list[Problem]:
    """`train.dpo` against DPOConfig: known fields, not ours, of a fitting type; a loss list TRL knows."""
    if not cfg.dpo:
        return []
    fields, errs = dpo_fields(), []
    # a recipe field's own name (warmup_ratio) or the TRL field it sets (warmup_steps): the recipe's is the place
    ours = {f.name: f"use train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    ours |= {trl: f"use train.{name}" for name, trl in MIRRORED.items()} | SET_BY_US
    for key, value in cfg.dpo.items():
        name = f"train.dpo.{key}"
        if key in ours and key not in ("loss_type", "dpo"):
            errs.append(Problem(name, ours[key]))
        elif key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            errs.append(Problem(name, f"not a field of TRL's DPOConfig{hint}"))
        elif not _fits(value, fields[key]):
            errs.append(Problem(name, f"expected {_type_text(fields[key])}, got {type(value).__name__} {value!r}"))
    if errs:
        return errs
    losses = cfg.dpo.get("loss_type")
    if losses is not None:
        if cfg.loss_type != "sigmoid" or cfg.sft_weight:
            errs.append(Problem("train.dpo.loss_type", "replaces train.loss_type and train.sft_weight: leave those "
                                                       "unset, or use them instead"))
        known = trl_loss_types()
        bad = [t for t in losses if t not in known]
        if bad or not losses:
            errs.append(Problem("train.dpo.loss_type", f"unknown {bad} (TRL knows {', '.join(known)})" if bad
                                else "must name at least one loss"))
    weights = cfg.dpo.get("loss_weights")
    if weights is not None:
        if cfg.sft_weight:
            errs.append(Problem("train.dpo.loss_weights", "train.sft_weight sets the weights: use one or the other"))
        elif len(weights) != len(losses or [cfg.loss_type]):
            errs.append(Problem("train.dpo.loss_weights", f"{len(weights)} weights for "
                                                          f"{len(losses or [cfg.loss_type])} loss type(s)"))
    return errs


def _fits(value, tp) -> bool:
    """Whether a YAML value fits a field's type; True where the type is beyond checking here (a class TRL builds)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is typing.Literal:
        return value in typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp}
    if tp in (dict, list):
        return isinstance(value, tp)
    try:
        convert_value(value, tp, "")
        return True
    except ConfigTypeError as e:
        return e.message.startswith("unsupported type")


def _type_text(tp) -> str:
    return re.sub(r"(?:<class '|')|[\w.]+\.(?=\w+\b)", "", str(tp)) if not isinstance(tp, type) else tp.__name__
