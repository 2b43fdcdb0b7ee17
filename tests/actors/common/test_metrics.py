"""Metrics inside a Chain call: held until the call returns, so a batch Ray Data retries after a later stage
failed counts once in the stages it passed before."""
from __future__ import annotations

import pyarrow as pa
import pytest

from actors.common import guard, metrics
from pipelines.generate.chain import Chain


@pytest.fixture
def counted(monkeypatch):
    """What reaches Ray's counters: (name, stage or outcome tag, value) per non-zero increment."""
    calls = []

    class Counter:
        def __init__(self, name):
            self.name = name

        def inc(self, value, tags):
            calls.append((self.name, tags.get("stage") or tags.get("outcome"), value))
    monkeypatch.setattr(metrics, "_metric", lambda kind, name, *a, **k: Counter(name))
    return calls


class Images:
    def __init__(self, cfg=None):
        pass

    def __call__(self, batch):
        return guard.guarded("images", batch, lambda b: b.append_column("image", pa.array([b"png"] * b.num_rows)))


class FlakyRewards:
    """Dies on its first call as after a CUDA error (outside a Ray worker the guard re-raises it)."""
    calls = 0

    def __init__(self, cfg=None):
        pass

    def __call__(self, batch):
        def score(b):
            FlakyRewards.calls += 1
            if FlakyRewards.calls == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            metrics.count("synthalign_pairs", b.num_rows, "image-questions by outcome", outcome="kept")
            return b.append_column("reward", pa.array([1.0] * b.num_rows))
        return guard.guarded("rewards", batch, score)


def prompts(n: int = 3):
    return pa.table({"prompt_id": [f"p{i}" for i in range(n)]})


def test_a_retried_chain_call_counts_each_stage_once(counted):
    chain = Chain([(Images, {}, False), (FlakyRewards, {}, False)])
    with pytest.raises(RuntimeError, match="CUDA error"):
        chain(prompts())
    assert counted == []                      # the failed call reports nothing, not even the stage it passed
    out = chain(prompts())                    # Ray Data's retry of the batch
    assert out.num_rows == 3 and out.column("reward").to_pylist() == [1.0] * 3
    assert sorted(counted) == sorted([("synthalign_stage_rows", "images", 3), ("synthalign_pairs", "kept", 3),
                                      ("synthalign_stage_rows", "rewards", 3)])   # zero counts are no increments


def test_a_stage_outside_a_chain_reports_at_once(counted):
    with pytest.raises(RuntimeError):
        with metrics.held():
            Images()(prompts(2))
            assert counted == []              # held while the block runs
            raise RuntimeError("a later stage failed")
    assert counted == []
    Images()(prompts(2))
    assert ("synthalign_stage_rows", "images", 2) in counted


def test_nested_holds_report_once_when_the_outer_block_ends(counted):
    with metrics.held():
        with metrics.held():
            metrics.record_stage("selection", pa.table({"error": pa.array([None, "selection: x"], pa.string())}))
        assert counted == []
    assert sorted(counted) == [("synthalign_stage_failed_rows", "selection", 1),
                               ("synthalign_stage_rows", "selection", 1)]   # once, not once per block
