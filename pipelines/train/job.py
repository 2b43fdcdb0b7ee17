"""DPO post-training on Ray Train (TRL DPOTrainer + PEFT LoRA + optional DeepSpeed).

The driver side: `run_train` checks the recipe and starts a Ray Train `TorchTrainer`; what each worker runs is
in `pipelines.train.worker`. Library code never calls `ray.init`: the CLI and tests connect first.

output_dir is a local folder or an object-storage URI (s3://, gs://, abfs://); so are the pairs. On a cluster
the nodes need the storage's credentials in their environment (`synthalign submit` forwards AWS_* and the
like in the job's runtime_env). Layout under `<output_dir>/train/` (pipelines.layout.RunLayout.train_paths):
    ray/dpo/      Ray Train run (checkpoints; a rerun on the same output_dir resumes from the latest one)
    adapter/      PEFT adapter + processor          merged/   merged model (cfg.merge_adapter)
    metrics.jsonl one line per logged step           tb/       TensorBoard events
    summary.json  what `run_train` returns (`status: complete`), or `status: failed` and the reason
The records the workers train on are built on each node, in a scratch folder of its own (pipelines.train.outputs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from pathlib import Path

from actors.common.errors import InputError, failure_reason, raise_first
from actors.common.files import looks_local
from cluster.storage import Location, check_everywhere, is_uri
from pipelines.layout import RunLayout
from pipelines.train.config import (
    TrainConfig,
    check_with_libraries,
    load_deepspeed_config,
)
from pipelines.train.data import check_pairs


def check_recipe(cfg: TrainConfig) -> TrainConfig:
    """The recipe checked against the config rules and what TRL and transformers accept, with a local model
    made absolute (Ray Train workers run in their own working directory). Raises InputError."""
    raise_first(cfg.validate() + check_with_libraries(cfg))
    if cfg.init_adapter:
        remote = is_uri(cfg.init_adapter)
        where = Location(cfg.init_adapter if remote else str(Path(cfg.init_adapter).expanduser().resolve()))
        try:
            found = (where / "adapter_config.json").is_file()
        except OSError:   # an object store that refuses (no bucket, no credentials)
            found = False
        if not found:
            raise InputError(f"no PEFT adapter at {cfg.init_adapter}", field="train.init_adapter")
        cfg = dataclasses.replace(cfg, init_adapter=str(where))
    if Path(cfg.model).expanduser().exists():
        return dataclasses.replace(cfg, model=str(Path(cfg.model).expanduser().resolve()))
    if looks_local(cfg.model):
        raise InputError(f"model folder not found: {cfg.model}", field="train.model")
    return cfg  # a hub id


def run_train(cfg: TrainConfig, data_path: str | None, output_dir: str, resume: bool = True, *,
              fail_at_step: int | None = None) -> dict:
    """Train a LoRA adapter with DPO on Ray Train; returns a summary dict.

    data_path: folder (or file) of pairs *.parquet, local or a URI (None: cfg.data, else `<output_dir>/pairs`).

    resume=True continues the Ray Train run stored under `<output_dir>/train/ray/dpo` from its latest checkpoint;
    resume=False deletes that run and the previous outputs first. `fail_at_step` is a test hook: every worker
    raises right after the checkpoint of that step in an attempt that started before it (so a retry under
    `max_failures` or a rerun goes past it).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from cluster.resources import scaling_config
    from pipelines.train import worker as train_worker
    cfg = check_recipe(cfg)
    if not is_uri(output_dir):
        output_dir = str(Path(output_dir).resolve())
    paths = RunLayout(output_dir).train_paths()
    files = check_pairs(data_path or cfg.data or str(RunLayout(output_dir).pairs))   # before any worker
    if not ray.is_initialized():
        raise RuntimeError("run_train needs a Ray connection: call ray.init() first (the CLI does)")
    check_everywhere(RunLayout(output_dir).root)   # a local output_dir on several nodes: every node must see it
    try:
        _clear(paths, resume)
    except OSError as e:   # an object store that refuses (no bucket, no credentials)
        raise InputError(f"cannot write the training output: {e}", file=str(paths["root"])) from None

    # The workers read the Parquet files themselves (pipelines.train.data.build_trl_dataset): the driver never
    # holds the pairs, and no worker holds more than a batch of them in memory.
    loop_config = {
        "files": files,
        "cfg": cfg,
        "deepspeed": load_deepspeed_config(cfg.deepspeed) if cfg.deepspeed else None,
        "paths": {k: str(v) for k, v in paths.items()},
        "run_id": uuid.uuid4().hex[:12],   # names each node's scratch folder for this call
        "fail_at_step": fail_at_step,
    }
    # Ray Train writes and finds its checkpoints itself, through pyarrow, on a local path or a URI alike.
    ray_dir = paths["ray"]
    try:
        trainer = TorchTrainer(
            train_worker.train_loop,
            train_loop_config=loop_config,
            scaling_config=scaling_config(cfg.workers),
            run_config=RunConfig(
                storage_path=str(ray_dir.local) if ray_dir.local else ray_dir.uri, name=paths["run"].name,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
                failure_config=FailureConfig(max_failures=cfg.max_failures)),
        )
        result = trainer.fit()
        if not paths["summary"].exists():
            raise RuntimeError(f"training finished without writing {paths['summary']} (see the Ray worker logs)")
        summary = json.loads(paths["summary"].read_text())
    except BaseException as e:   # a reader of the folder sees why training ended, not just no summary
        with contextlib.suppress(OSError):   # storage that refuses this too: the first error counts
            paths["summary"].write_text(json.dumps({"status": "failed", "reason": training_failure(e)}, indent=2))
        raise
    summary.update({
        "status": "complete", "output_dir": str(paths["root"]), "adapter": str(paths["adapter"]),
        "merged": str(paths["merged"]) if cfg.merge_adapter else None,
        "metrics": str(paths["metrics"]), "tensorboard": str(paths["tb"]) if "tensorboard" in cfg.report_to
        else None, "checkpoint": _checkpoint_uri(result.checkpoint, ray_dir),
    })
    paths["summary"].write_text(json.dumps(summary, indent=2))
    return summary


def training_failure(e: BaseException) -> str:
    """Why training ended, in a line: Ray Train's own error names its workers' errors only in a long text, so the
    lowest failed rank's error is named (or the controller's)."""
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        return f"{type(e).__name__}: rank {rank}: {failure_reason(failures[rank])}"[:500]
    inner = getattr(e, "controller_failure", None)
    return failure_reason(inner if isinstance(inner, BaseException) else e)


def _clear(paths: dict[str, Location], resume: bool) -> None:
    """Without resume, the Ray Train run and the previous outputs go first; the old summary goes always (a
    summary is written last: it marks a finished run, or says why it failed)."""
    if not resume:
        for key in ("run", "adapter", "merged", "tb", "data"):
            paths[key].rmtree()
        paths["metrics"].unlink()
    paths["root"].mkdir()
    paths["summary"].unlink()


def _checkpoint_uri(checkpoint, ray_dir: Location) -> str | None:
    """Ray's checkpoint path is a path on its filesystem: a URI again on object storage."""
    if checkpoint is None:
        return None
    if not ray_dir.remote:
        return checkpoint.path
    return f"{ray_dir.uri.split('://', 1)[0]}://{checkpoint.path.lstrip('/')}"


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The per-step lines of `<output_dir>/train/metrics.jsonl` (a local folder or a URI)."""
    p = RunLayout(output_dir).train_paths()["metrics"]
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
