"""A finished generate run's figures, sent where training's go (`train.report_to`): the manifest's counts, drop
reasons and timings as scalars, rows per second, and histograms of the answers' rewards (`candidates/`) and the
kept pairs' margins (`pairs/`).

TensorBoard events go to `tb/generate/` in the run folder (on object storage: written to a local temporary folder,
then uploaded); W&B and MLflow get the same figures when they are installed (their usual environment variables,
`WANDB_PROJECT`, `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`, pick the project). The step is the round number
for a round of `rounds: N` (`<output_dir>/rounds/<r>/`), else 0. Reporting is best-effort: a failure is logged in
one line and never fails the run.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import tempfile
from pathlib import Path

from cluster.storage import Location, read_table
from pipelines.layout import RunLayout

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "wandb", "mlflow")
COUNTS = ("prompts", "questions", "answers", "pairs", "errors", "duplicates_skipped", "images_rendered",
          "prompts_resumed")
# counts per second of the stream; a resumed run's counts cover the whole folder, so only a fresh run's rates
RATES = ("questions", "answers", "pairs")


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]+", "_", str(name))


def scalars(manifest: dict) -> dict[str, float]:
    """`generate/<count>`, `generate/dropped/<reason>`, `timings/<phase>` (seconds) and `rate/<count>_per_s`."""
    counts, timings = manifest.get("counts") or {}, manifest.get("timings_s") or {}
    out = {f"generate/{k}": float(counts[k]) for k in COUNTS if k in counts}
    out.update({f"generate/dropped/{_tag(r)}": float(n) for r, n in (counts.get("dropped") or {}).items()})
    for k, v in timings.items():
        if isinstance(v, (int, float)):
            out[f"timings/{_tag(k)}"] = float(v)
    for stage, s in (timings.get("model_load_by_stage") or {}).items():
        out[f"timings/model_load/{_tag(stage)}"] = float(s)
    stream = float(timings.get("stream") or 0)
    if stream > 0:
        if counts.get("images_rendered"):
            out["rate/images_per_s"] = counts["images_rendered"] / stream
        if not counts.get("prompts_resumed"):
            out.update({f"rate/{k}_per_s": counts[k] / stream for k in RATES if k in counts})
    return out


def view_column(folder: Location, column: str):
    """One float column of a finished view (its `part-*.parquet` files), non-finite values left out."""
    import numpy as np
    parts = [read_table(f, [column]) for f in Location(folder).glob("part-*.parquet")]
    values = [t.column(column).to_numpy(zero_copy_only=False) for t in parts if column in t.column_names]
    v = np.concatenate(values).astype(np.float64) if values else np.zeros(0)
    return v[np.isfinite(v)]


def histograms(layout: RunLayout) -> dict:
    return {"generate/reward": view_column(layout.candidates, "reward"),
            "generate/margin": view_column(layout.pairs, "margin")}


def round_number(layout: RunLayout) -> int:
    """r for a round folder `<top>/rounds/<r>` (the layout's round_dir), else 0."""
    found = layout.round_of()
    return found[1] if found else 0


def _tensorboard(layout: RunLayout, values: dict, hists: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter
    dest = layout.generate_tb
    staging = Path(tempfile.mkdtemp(prefix="generate-tb-")) if dest.remote else None
    local = staging or dest.local
    dest.rmtree()   # one events file: the counts are the whole folder's, a resume's would repeat them
    try:
        with SummaryWriter(str(local)) as w:
            for k, v in values.items():
                w.add_scalar(k, v, step)
            for k, v in hists.items():
                if len(v):
                    w.add_histogram(k, v, step)
        if staging:
            import pyarrow.fs as pafs
            pafs.copy_files(str(staging), dest.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=dest.fs)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _wandb(layout: RunLayout, values: dict, hists: dict, step: int) -> None:
    import os

    import wandb
    run = wandb.init(project=os.getenv("WANDB_PROJECT", "synthalign"), job_type="generate",
                     name=f"generate {layout.root.uri}", config={"output_dir": layout.root.uri})
    try:
        run.log({**values, **{k: wandb.Histogram(v) for k, v in hists.items() if len(v)}}, step=step)
    finally:
        run.finish()


def _mlflow(layout: RunLayout, values: dict, hists: dict, step: int) -> None:
    import os

    import mlflow
    import numpy as np
    if os.getenv("MLFLOW_EXPERIMENT_NAME"):
        mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
    # MLflow has no histograms: their quantiles as metrics, the bins as an artifact
    quantiles = {f"{k}/p{q}": float(np.percentile(v, q)) for k, v in hists.items() if len(v) for q in (10, 50, 90)}
    with mlflow.start_run(run_name=f"generate {layout.root.uri}"):
        mlflow.log_metrics({**values, **quantiles}, step=step)
        for k, v in hists.items():
            if len(v):
                counts, edges = np.histogram(v, bins=30)
                mlflow.log_dict({"counts": counts.tolist(), "edges": edges.tolist()}, f"{_tag(k)}.json")


WRITERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}


def report_generate(layout: RunLayout, report_to: list[str], manifest: dict) -> list[str]:
    """Send a finished run's figures to each backend of `report_to` that is installed; returns those written.
    Nothing is raised: each failure is one logged line."""
    wanted = [b for b in BACKENDS if b in report_to]
    if not wanted or "counts" not in manifest:
        return []
    try:
        values, hists, step = scalars(manifest), histograms(layout), round_number(layout)
    except Exception as e:   # a view that cannot be read: the run stands, its figures are not sent
        log.warning("generate metrics not reported: %s", _line(e))
        return []
    done = []
    for name in wanted:
        try:
            if importlib.util.find_spec(name) is None:   # never imported unless asked for and installed
                log.warning("generate metrics not sent to %s: it is not installed", name)
                continue
            WRITERS[name](layout, values, hists, step)
            done.append(name)
        except Exception as e:
            log.warning("generate metrics not sent to %s: %s", name, _line(e))
    return done


def _line(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0]
