"""DPO post-training on Ray Train (TRL DPOTrainer + PEFT LoRA + optional DeepSpeed). Owned by the training work.

The driver side lives here: config, validation, the pairs -> TRL record conversion and `run_train`, which starts a
Ray Train `TorchTrainer`. What each worker runs is in `pipelines.train_worker`. Library code never calls
`ray.init`: the CLI and tests connect first.

Layout under `<output_dir>/train/`:
    ray/dpo/      Ray Train run (checkpoints; a rerun on the same output_dir resumes from the latest one)
    adapter/      PEFT adapter + processor          merged/   merged model (cfg.merge_adapter)
    metrics.jsonl one line per logged step           tb/       TensorBoard events
    summary.json  what `run_train` returns
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cluster.resources import WorkersConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# Columns of the pairs Parquet the training reads (see actors.contract.PAIR_COLUMNS).
TRAIN_COLUMNS = ("pair_id", "image", "question", "chosen", "rejected")
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self, name: str = "train.lora") -> list[str]:
        errs = []
        if self.r < 1:
            errs.append(f"{name}.r: must be >= 1")
        if self.alpha <= 0:
            errs.append(f"{name}.alpha: must be > 0")
        if not 0 <= self.dropout < 1:
            errs.append(f"{name}.dropout: must be in [0, 1)")
        if not self.target_modules:
            errs.append(f"{name}.target_modules: must name at least one module")
        if "lm_head" in self.target_modules:
            errs.append(f"{name}.target_modules: 'lm_head' is not supported by TRL's DPOTrainer")
        return errs


@dataclass
class TrainConfig:
    model: str = ""                   # base VLM: hub id or local path
    data: str | None = None           # pairs Parquet folder; default {output_dir}/pairs
    lora: LoraConfig = field(default_factory=LoraConfig)
    beta: float = 0.1
    loss_type: str = "sigmoid"
    # > 0 adds the NLL of the chosen answers with this weight (RPO, Pang et al. 2024). DPO alone may lower the
    # likelihood of chosen and rejected alike; on one-word answers the mass then drifts to junk tokens.
    sft_weight: float = 0.0
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
    # Rows whose prompt (image tokens included) plus the longer answer exceed this many tokens are dropped and
    # counted, never truncated: truncation can cut image tokens. None keeps every row.
    max_length: int | None = None
    gradient_checkpointing: bool = True
    optim: str = "adamw_torch"        # torch AdamW: DeepSpeed's fused/CPU Adam compile for minutes on first use
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def validate(self) -> list[str]:
        errs = self.workers.validate("train.workers")
        errs += self.lora.validate("train.lora")
        if self.learning_rate <= 0:
            errs.append("train.learning_rate: must be > 0")
        if self.beta <= 0:
            errs.append("train.beta: must be > 0")
        if self.sft_weight < 0:
            errs.append("train.sft_weight: must be >= 0")
        if self.loss_type not in LOSS_TYPES:
            errs.append(f"train.loss_type: unknown {self.loss_type!r} (one of {', '.join(LOSS_TYPES)})")
        if self.lr_scheduler_type not in SCHEDULERS:
            errs.append(f"train.lr_scheduler_type: unknown {self.lr_scheduler_type!r}")
        if not 0 <= self.warmup_ratio < 1:
            errs.append("train.warmup_ratio: must be in [0, 1)")
        if self.max_steps == 0 or self.max_steps < -1:
            errs.append("train.max_steps: must be -1 (use num_train_epochs) or >= 1")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            errs.append("train.num_train_epochs: must be > 0 when max_steps is -1")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps",
                     "num_to_keep"):
            if getattr(self, name) < 1:
                errs.append(f"train.{name}: must be >= 1")
        if self.max_failures < -1:
            errs.append("train.max_failures: must be >= -1 (-1 retries forever)")
        if self.max_length is not None and self.max_length < 1:
            errs.append("train.max_length: must be >= 1 or null")
        bad = [r for r in self.report_to if r not in REPORT_TO]
        if bad:
            errs.append(f"train.report_to: unknown {bad} (known: {', '.join(REPORT_TO)})")
        if self.deepspeed is not None:
            try:
                load_deepspeed_config(self.deepspeed)
            except (OSError, ValueError) as e:
                errs.append(f"train.deepspeed: {e}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            errs.append("train.weight_decay and train.max_grad_norm: must be >= 0")
        return errs


def resolve_deepspeed_path(path: str) -> Path:
    """An absolute path, a path relative to the working directory, or one relative to the repository."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def load_deepspeed_config(path: str) -> dict:
    """Read a DeepSpeed JSON; the dict (not the path) goes to the workers so other nodes need no file."""
    p = resolve_deepspeed_path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no DeepSpeed config at {p}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "zero_optimization" not in data:
        raise ValueError(f"{p}: expected a DeepSpeed config with a 'zero_optimization' block")
    return data


# ---------------------------------------------------------------- pairs rows -> TRL vision preference format

def trl_messages(question: str, chosen: str, rejected: str) -> dict:
    """TRL's conversational vision preference format (one image placeholder before the question)."""
    return {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
    }


def row_problem(row: dict) -> str | None:
    """Why a pairs row cannot be trained on, or None. Opens the image header only (no full decode)."""
    import io

    from PIL import Image, UnidentifiedImageError
    for name in ("question", "chosen", "rejected"):
        v = row.get(name)
        if not isinstance(v, str) or not v.strip():
            return f"empty {name}"
    if row["chosen"].strip() == row["rejected"].strip():
        return "chosen == rejected"
    data = row.get("image")
    if not isinstance(data, (bytes, bytearray)) or not data:
        return "no image"
    try:
        Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        return "undecodable image"
    return None


def to_trl_records(table_or_rows, drop_invalid: bool = True) -> list[dict]:
    """Pairs rows (a pyarrow Table or a list of dicts) -> TRL records: images [PIL], prompt, chosen, rejected.

    Rows `row_problem` rejects are skipped (or raise ValueError when drop_invalid is False). `pair_id` is kept
    when present; TRL ignores extra keys.
    """
    from actors.runtime import open_png
    rows = table_or_rows.to_pylist() if hasattr(table_or_rows, "to_pylist") else list(table_or_rows)
    out = []
    for i, row in enumerate(rows):
        problem = row_problem(row)
        if problem:
            if drop_invalid:
                continue
            raise ValueError(f"row {i} ({row.get('pair_id')}): {problem}")
        rec = {"images": [open_png(row["image"])], **trl_messages(row["question"], row["chosen"], row["rejected"])}
        if "pair_id" in row:
            rec["pair_id"] = row["pair_id"]
        out.append(rec)
    return out


# ---------------------------------------------------------------- driver

def train_paths(output_dir: str | Path) -> dict[str, Path]:
    root = Path(output_dir) / "train"
    return {"root": root, "ray": root / "ray", "run": root / "ray" / "dpo", "adapter": root / "adapter",
            "merged": root / "merged", "metrics": root / "metrics.jsonl", "tb": root / "tb",
            "summary": root / "summary.json"}


def _absolute_if_local(path: str, key: str) -> str:
    from actors.errors import InputError
    p = Path(path).expanduser()
    if p.exists():
        return str(p.resolve())
    if path.startswith(("/", "./", "../", "~", ".")):
        raise InputError(f"model folder not found: {path}", field=key)
    return path  # a hub id


def _parquet_files(data_path: str) -> list[str]:
    """The pairs Parquet files of a folder (or one file), each checked for the columns training reads."""
    import pyarrow.parquet as pq

    from actors.errors import InputError
    if "://" in data_path:          # remote storage: let Ray Data list and read it
        return [data_path]
    p = Path(data_path).resolve()
    files = [str(p)] if p.is_file() else sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else []
    if not files:
        raise InputError("no *.parquet pairs files found (run `synthalign generate` first)", file=str(p))
    for f in files:
        missing = [c for c in TRAIN_COLUMNS if c not in pq.read_schema(f).names]
        if missing:
            raise InputError(f"not a pairs file: missing column(s) {missing}", file=f)
    return files


def run_train(cfg: TrainConfig, data_path: str | None, output_dir: str, resume: bool = True, *,
              fail_at_step: int | None = None) -> dict:
    """Train a LoRA adapter with DPO on Ray Train; returns a summary dict.

    data_path: folder of pairs *.parquet (None: cfg.data, else `<output_dir>/pairs`).

    resume=True continues the Ray Train run stored under `<output_dir>/train/ray/dpo` from its latest checkpoint;
    resume=False deletes that run and the previous outputs first. `fail_at_step` is a test hook: every worker
    raises right after the checkpoint of that step in an attempt that started before it (so a retry under
    `max_failures` or a rerun goes past it).
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from cluster.resources import scaling_config
    from pipelines import train_worker

    from actors.errors import InputError
    errs = cfg.validate()
    if not cfg.model:   # checked here, not in validate(): generate-only configs need no train.model
        errs.append("train.model: required (hub id or local path of the base VLM)")
    if errs:
        key, _, msg = errs[0].partition(": ")
        raise InputError(msg + (f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""), field=key)
    # Ray Train workers run in their own working directory: hand them absolute local paths.
    output_dir = str(Path(output_dir).resolve())
    cfg = dataclasses.replace(cfg, model=_absolute_if_local(cfg.model, "train.model"))
    files = _parquet_files(data_path or cfg.data or str(Path(output_dir) / "pairs"))
    if not ray.is_initialized():
        raise RuntimeError("run_train needs a Ray connection: call ray.init() first (the CLI does)")
    paths = train_paths(output_dir)
    if not resume:
        for key in ("run", "adapter", "merged", "tb"):
            shutil.rmtree(paths[key], ignore_errors=True)
        for key in ("metrics", "summary"):
            paths[key].unlink(missing_ok=True)
    paths["root"].mkdir(parents=True, exist_ok=True)
    paths["summary"].unlink(missing_ok=True)

    # Materialized here, before the workers take their CPUs: Ray Data's budget excludes Train's reservation, so
    # read tasks started from inside the workers can wait forever on a cluster the workers fill (2 CPUs, 2 workers).
    ds = ray.data.read_parquet(files, columns=list(TRAIN_COLUMNS)).materialize()
    loop_config = {
        "cfg": cfg,
        "deepspeed": load_deepspeed_config(cfg.deepspeed) if cfg.deepspeed else None,
        "paths": {k: str(v) for k, v in paths.items()},
        "fail_at_step": fail_at_step,
    }
    trainer = TorchTrainer(
        train_worker.train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg.workers),
        run_config=RunConfig(
            storage_path=str(paths["ray"].resolve()), name="dpo",
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": ds},
        # Every worker gets all rows; the HF Trainer's distributed sampler shards them by rank with a seeded,
        # resumable order (a streaming split is not reproducible, so resume could not skip the seen batches).
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if not paths["summary"].exists():
        raise RuntimeError(f"training finished without writing {paths['summary']} (see the Ray worker logs)")
    summary = json.loads(paths["summary"].read_text())
    summary.update({
        "output_dir": str(paths["root"]), "adapter": str(paths["adapter"]),
        "merged": str(paths["merged"]) if cfg.merge_adapter else None,
        "metrics": str(paths["metrics"]), "tensorboard": str(paths["tb"]) if "tensorboard" in cfg.report_to
        else None, "checkpoint": result.checkpoint.path if result.checkpoint else None,
    })
    paths["summary"].write_text(json.dumps(summary, indent=2))
    return summary


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The per-step lines of `<output_dir>/train/metrics.jsonl`."""
    p = train_paths(output_dir)["metrics"]
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
