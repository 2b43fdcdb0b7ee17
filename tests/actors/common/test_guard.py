"""The row guard: which rows a stage's metrics count, and which errors end the actor instead of a row."""
from __future__ import annotations

import pyarrow as pa
import pytest

from actors.common import guard, metrics


def batch():
    """Two good rows, one that fails at this stage, one that failed upstream and only passes through."""
    return pa.table({"prompt_id": ["a", "bad", "c", "up"],
                     "error": pa.array([None, None, None, "images: RuntimeError: boom"], pa.string())})


def add_y(b):
    if "bad" in b.column("prompt_id").to_pylist():
        raise ValueError("a bad row")
    return b.append_column("y", pa.array([1] * b.num_rows))


@pytest.fixture
def counted(monkeypatch):
    calls = {}

    def count(name, value, description, **tags):
        key = (name, tags["stage"])
        calls[key] = calls.get(key, 0) + value
    monkeypatch.setattr(metrics, "count", count)
    return calls


def test_stage_metrics_count_only_the_rows_the_stage_processed(counted):
    out = guard.guarded("pairs", batch(), add_y)
    errors = dict(zip(out.column("prompt_id").to_pylist(), out.column("error").to_pylist()))
    assert errors["a"] is None and errors["c"] is None and errors["bad"].startswith("pairs: ValueError")
    assert errors["up"].startswith("images:")  # passed through untouched
    assert counted.get(("synthalign_stage_rows", "pairs"), 0) == 2
    assert counted.get(("synthalign_stage_failed_rows", "pairs"), 0) == 1


def test_a_batch_of_upstream_failures_counts_nothing(counted):
    up = batch().filter(pa.array([False, False, False, True]))
    assert guard.guarded("pairs", up, add_y).num_rows == 1
    assert sum(counted.values()) == 0


def named(name: str, base: type = Exception) -> type:
    return type(name, (base,), {})


def _chained():
    try:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    except RuntimeError as e:
        try:
            raise ValueError("could not score the batch") from e
        except ValueError as wrapped:
            return wrapped


FATAL = {
    "memory": lambda: MemoryError(),
    "cuda-oom": lambda: named("OutOfMemoryError", RuntimeError)("CUDA out of memory. Tried to allocate 2 GiB"),
    "cuda-error": lambda: RuntimeError("CUDA error: device-side assert triggered"),
    "device-assert": lambda: RuntimeError("../aten/src/ATen/native/cuda/Indexing.cu: device-side assert failed"),
    "nccl": lambda: RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"),
    "vllm-v1": lambda: named("EngineDeadError")("EngineCore encountered an issue."),
    "vllm-v0": lambda: named("AsyncEngineDeadError", RuntimeError)("Background loop has errored already."),
    "dead-engine": lambda: named("DeadEngine")("the engine is gone"),
    "ours": lambda: guard.FatalStageError("the judge endpoint is gone for good"),
    "wrapped-cuda": _chained,
}
ROW_LEVEL = {
    "value": lambda: ValueError("non-finite reward (NaN or inf)"),
    "image": lambda: OSError("cannot identify image file"),
    "runtime": lambda: RuntimeError("The size of tensor a (4097) must match the size of tensor b (4096)"),
    "key": lambda: KeyError("pixel_values"),
}


@pytest.mark.parametrize("make", FATAL.values(), ids=FATAL.keys())
def test_fatal_errors_are_raised_not_quarantined(make, counted):
    """Outside a Ray worker the guard re-raises (inside one it ends the actor: see test_resume.py)."""
    calls, err = [], make()

    def broken(b):
        calls.append(b.num_rows)
        raise err
    with pytest.raises(Exception) as info:
        guard.guarded("sampling:m", batch(), broken)
    assert info.value is err and guard.is_fatal(err)
    assert calls == [3]  # the whole batch once: no row-by-row retry that would quarantine every row
    assert sum(counted.values()) == 0


@pytest.mark.parametrize("make", ROW_LEVEL.values(), ids=ROW_LEVEL.keys())
def test_row_level_errors_are_quarantined(make, counted):
    err = make()

    def broken(b):
        raise err
    out = guard.guarded("rewards", batch(), broken)
    assert not guard.is_fatal(err)
    errors = out.column("error").to_pylist()
    assert sum(e.startswith("rewards: ") for e in errors) == 3 and out.num_rows == 4
    assert counted[("synthalign_stage_failed_rows", "rewards")] == 3


def test_fatal_fault_kind_is_a_config_choice():
    assert guard.FaultConfig(stage="sampling", kind="fatal").validate() == []
    assert [p.key for p in guard.FaultConfig(stage="sampling", kind="boom").validate()] == ["faults.kind"]
