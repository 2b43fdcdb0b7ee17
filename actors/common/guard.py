"""Bad rows never sink a job: a failing batch is retried row by row, and rows that still fail carry an
`error` ("stage: reason") that later stages pass through untouched and the job writes to `errors/`.

Also the test-only fault injection (`faults:` in the run config, shipped to actors as SYNTHALIGN_FAULTS):
a chosen stage raises, or kills its own actor process, once per chosen row. A marker file per
(stage, row) makes a fault fire once, so Ray's actor restart and batch retry then succeed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from actors.common.errors import Problem

FAULTS_ENV = "SYNTHALIGN_FAULTS"
ROW_ATTEMPTS = 2  # a transient failure (a flaky judge endpoint, a one-off OOM) gets one more go


@dataclass
class FaultConfig:
    """Test-only: make `stage` fail on rows whose prompt_id is listed."""
    stage: str = ""                    # images | selection | sampling | rewards
    prompt_ids: list[str] = field(default_factory=list)
    kind: str = "raise"                # raise | exit (os._exit: the actor process dies) | sleep (a slow row)
    marker_dir: str = ""               # where "fired" markers go (default: <output_dir>/.faults)
    times: int = 1                     # how often a row fails; -1: always (a permanently bad row)
    seconds: float = 30.0              # kind sleep: how long

    def validate(self) -> list[Problem]:
        errs = []
        if self.kind not in ("raise", "exit", "sleep"):
            errs.append(Problem("faults.kind", "must be 'raise', 'exit' or 'sleep'"))
        return errs


def _inject(stage: str, batch) -> None:
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    f = json.loads(spec)
    if not stage.startswith(f["stage"]):
        return
    for pid in batch.column("prompt_id").to_pylist():
        if pid in f["prompt_ids"]:
            marker = Path(f["marker_dir"]) / f"{stage.replace(':', '_')}-{pid}"
            fired = len(marker.read_text().split()) if marker.exists() else 0
            if 0 <= f.get("times", 1) <= fired:
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            with marker.open("a") as fh:
                fh.write(f"{os.getpid()}\n")
            if f["kind"] == "exit":
                os._exit(17)
            if f["kind"] == "sleep":
                import time
                time.sleep(f["seconds"])
                continue
            raise RuntimeError(f"injected fault at {stage} for {pid}")


def _error_reason(stage: str, exc: BaseException) -> str:
    return f"{stage}: {type(exc).__name__}: {exc}"[:500]


def guarded(stage: str, batch, process, drops=()):
    """Run `process` on the rows without an error; see the module docstring."""
    import pyarrow as pa
    import pyarrow.compute as pc
    failed = None
    if "error" in batch.column_names:
        ok_mask = pc.is_null(batch.column("error"))
        failed = batch.filter(pc.invert(ok_mask))
        batch = batch.filter(ok_mask)
    parts = []
    if batch.num_rows:
        try:
            _inject(stage, batch)
            parts.append(process(batch))
        except Exception:
            for i in range(batch.num_rows):
                parts.append(_one_row(stage, batch.slice(i, 1), process, drops))
    if failed is not None and failed.num_rows:
        parts.append(failed.drop_columns([c for c in drops if c in failed.column_names]))
    if not parts:
        return batch
    out = pa.concat_tables([_with_error(p) for p in parts], promote_options="permissive")
    from actors.common.metrics import record_stage
    record_stage(stage, out)
    return out


def _one_row(stage: str, row, process, drops, attempts: int = ROW_ATTEMPTS):
    """A row gets `attempts` tries of its own; only a row that fails every time is quarantined."""
    for attempt in range(attempts):
        try:
            _inject(stage, row)
            return process(row)
        except Exception as e:
            last = e
    bad = row.drop_columns([c for c in drops if c in row.column_names])
    return _set_error(bad, _error_reason(stage, last))


def _with_error(table):
    import pyarrow as pa
    if "error" not in table.column_names:
        return table.append_column("error", pa.nulls(table.num_rows, pa.string()))
    return table.set_column(table.column_names.index("error"), "error",
                            table.column("error").cast(pa.string()))


def _set_error(table, reason: str):
    import pyarrow as pa
    col = pa.array([reason] * table.num_rows, pa.string())
    if "error" in table.column_names:
        return table.set_column(table.column_names.index("error"), "error", col)
    return table.append_column("error", col)
