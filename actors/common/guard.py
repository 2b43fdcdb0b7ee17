"""Bad rows never sink a job: a failing batch is retried row by row, and rows that still fail carry an
`error` ("stage: reason") that later stages pass through untouched and the job writes to `errors/`.

A fatal error is no bad row: after a CUDA error, out-of-memory or a dead inference engine every later row
would fail too. The guard does not quarantine it; inside a Ray worker it ends the process, so Ray restarts
the actor and retries its batches (Ray Data retries a batch when its actor dies, not when the batch raises:
an exception would fail the whole job); elsewhere (unit tests, the in-process loop) it re-raises.

Also the test-only fault injection (`faults:` in the run config, shipped to actors as SYNTHALIGN_FAULTS):
a chosen stage raises, raises a fatal error, or kills its own actor process, once per chosen row. A marker
file per (stage, row) makes a fault fire once, so Ray's actor restart and batch retry then succeed.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from actors.common.errors import Problem

FAULTS_ENV = "SYNTHALIGN_FAULTS"
ROW_ATTEMPTS = 2  # a transient row-level failure (a flaky judge endpoint) gets one more go
FATAL_EXIT_CODE = 70  # the status a worker ended by a fatal error exits with (EX_SOFTWARE)
# RuntimeError texts of a broken device or collective: torch's CUDA errors, NCCL failures.
FATAL_MESSAGES = ("CUDA error", "CUDA out of memory", "device-side assert", "NCCL")


class FatalStageError(RuntimeError):
    """Raise it from a stage when its actor cannot go on (a model server gone for good, a corrupt model):
    the guard ends the actor instead of quarantining the rows."""


def is_fatal(exc: BaseException) -> bool:
    """True for errors after which no later row could succeed in this process: ours (FatalStageError),
    MemoryError, torch's (CUDA) OutOfMemoryError, CUDA / device-side assert / NCCL RuntimeErrors and vLLM's
    dead-engine errors (matched by class name: vllm is not imported here), also when they caused `exc`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FatalStageError, MemoryError)):
            return True
        names = [c.__name__ for c in type(exc).__mro__]
        if any(n == "OutOfMemoryError" or "EngineDead" in n or "DeadEngine" in n for n in names):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in FATAL_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def end_worker(stage: str, exc: BaseException) -> None:
    """After a fatal error: inside a Ray worker, end the process (Ray restarts the actor and retries the
    batch); elsewhere return, and the caller re-raises."""
    if not _in_ray_worker():
        return
    logging.getLogger(__name__).critical("%s; ending this actor so that Ray restarts it and retries the batch",
                                         _error_reason(stage, exc), exc_info=exc)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(FATAL_EXIT_CODE)


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")  # a process that never imported ray is no Ray worker
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray.WORKER_MODE


@dataclass
class FaultConfig:
    """Test-only: make `stage` fail on rows whose prompt_id is listed."""
    stage: str = ""                    # images | selection | sampling | rewards
    prompt_ids: list[str] = field(default_factory=list)  # the rows that fail
    kind: str = "raise"                # raise (a bad row) | fatal (a CUDA error: ends the actor) | exit (os._exit:
                                       # the actor process dies) | sleep (a slow row)
    marker_dir: str = ""               # where "fired" markers go (default: <output_dir>/.faults)
    times: int = 1                     # how often a row fails; -1: always (a permanently bad row)
    seconds: float = 30.0              # kind sleep: how long

    def validate(self) -> list[Problem]:
        errs = []
        if self.kind not in ("raise", "fatal", "exit", "sleep"):
            errs.append(Problem("faults.kind", "must be 'raise', 'fatal', 'exit' or 'sleep'"))
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
            if f["kind"] == "fatal":
                raise RuntimeError(f"CUDA error: an illegal memory access was encountered "
                                   f"(injected fatal fault at {stage} for {pid})")
            raise RuntimeError(f"injected fault at {stage} for {pid}")


def _error_reason(stage: str, exc: BaseException) -> str:
    return f"{stage}: {type(exc).__name__}: {exc}"[:500]


def guarded(stage: str, batch, process, drops=()):
    """Run `process` on the rows without an error; see the module docstring. The stage's metrics count the
    rows it processed (done or failed here), not the rows that failed upstream and only pass through; inside a
    Chain call they are reported when the whole call returns (`metrics.held`), so a retried batch counts once."""
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
        except Exception as e:
            if is_fatal(e):
                end_worker(stage, e)
                raise
            parts = [_one_row(stage, batch.slice(i, 1), process, drops) for i in range(batch.num_rows)]
    parts = [_with_error(p) for p in parts]
    if parts:
        from actors.common.metrics import record_stage
        record_stage(stage, pa.concat_tables(parts, promote_options="permissive"))
    if failed is not None and failed.num_rows:
        parts.append(_with_error(failed.drop_columns([c for c in drops if c in failed.column_names])))
    if not parts:
        return batch
    return pa.concat_tables(parts, promote_options="permissive")


def _one_row(stage: str, row, process, drops, attempts: int = ROW_ATTEMPTS):
    """A row gets `attempts` tries of its own; only a row that fails every time is quarantined."""
    for attempt in range(attempts):
        try:
            _inject(stage, row)
            return process(row)
        except Exception as e:
            if is_fatal(e):
                end_worker(stage, e)
                raise
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
