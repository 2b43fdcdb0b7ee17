"""Incremental views: a resume folds in only the new scored/ shards, leaves the other view files untouched, and
ends with the same rows and counts as a rebuild from scratch; a retry that succeeds later removes its error
row; a finalize killed before or after its commit leaves whole, consistent views."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.generate.views as views
from actors.pairs import PairBuilder, PairsConfig
from actors.rewards import RewardsConfig, RewardScorer
from pipelines.generate.outputs import finalize

ANSWERS = {"good": ["a cat on a couch", "a dog on a couch"], "same": ["a cat", "a cat"]}


def scored_shard(coco_vocab, rows: list[tuple[str, str, str | None]]):
    """Rows (pair_key, kind, error) through the real rewards and pairs stages; kind "same" is dropped
    (identical answers). A row with an error keeps its values, as the guard passes a failed row through."""
    n = len(rows)
    t = pa.table({"pair_key": [k for k, _, _ in rows], "prompt_id": [k.rsplit("-q", 1)[0] for k, _, _ in rows],
                  "image": [k.encode() for k, _, _ in rows], "question": ["Describe the image."] * n,
                  "answers": [ANSWERS[kind] for _, kind, _ in rows], "answer_models": [["m-a", "m-b"]] * n,
                  "gt_objects": [["cat", "couch"]] * n})
    t = PairBuilder(PairsConfig())(RewardScorer(RewardsConfig(weights={"coverage": 1.0}), coco_vocab)(t))
    return t.set_column(t.schema.get_field_index("error"), "error", pa.array([e for _, _, e in rows], pa.string()))


FAIL = "rewards: boom"
SHARDS = [
    [("p1-q0", "good", None), ("p2-q0", "good", FAIL), ("p3-q0", "good", FAIL), ("p4-q0", "same", None)],
    [("p5-q0", "good", None), ("p1-q0", "good", None), ("p3-q1", "good", FAIL)],  # p1-q0 again: a duplicate
    # The resume's shard: p2-q0's retry succeeds, p3-q0 fails again (its first error stands), p3-q1 retried fine.
    [("p2-q0", "good", None), ("p3-q0", "good", "images: again"), ("p6-q0", "good", None), ("p3-q1", "good", None)],
]


def write_shard(scored: Path, i: int, table) -> None:
    scored.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, scored / f"shard-{i:020d}-x.parquet")


def view_rows(out: Path, view: str) -> list[dict]:
    files = sorted((out / view).glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def file_stats(out: Path, view: str) -> dict:
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) for f in (out / view).glob("*.parquet")}


def rebuilt(tmp_path: Path, out: Path, name="full") -> tuple[Path, dict]:
    """The same scored/ folded from scratch in one go."""
    full = tmp_path / name
    shutil.copytree(out / "scored", full / "scored")
    return full, finalize(full, 2)


@pytest.fixture
def shards(coco_vocab):
    return [scored_shard(coco_vocab, rows) for rows in SHARDS]


def test_resume_folds_only_the_new_shard_and_equals_a_full_rebuild(tmp_path, shards):
    out = tmp_path / "run"
    write_shard(out / "scored", 0, shards[0])
    write_shard(out / "scored", 1, shards[1])
    first = finalize(out, 2)
    assert first["duplicates_skipped"] == 1 and first["errors"] == 3 and first["pairs"] == 2
    assert first["prompts"] == 5 and first["questions"] == 6  # p2, p3: prompts with failed rows only
    before = {v: file_stats(out, v) for v in ("pairs", "candidates")}

    write_shard(out / "scored", 2, shards[2])
    counts = finalize(out, 2)
    for v in ("pairs", "candidates"):
        after = file_stats(out, v)
        assert {k: after[k] for k in before[v]} == before[v]  # the folded files: same inode, time and bytes
        assert len(after) > len(before[v])  # new files appended beside them
    assert [r["pair_id"] for r in view_rows(out, "pairs")] == ["p1-q0", "p5-q0", "p2-q0", "p6-q0", "p3-q1"]
    errors = view_rows(out, "errors")
    assert [(e["pair_key"], e["stage"], e["reason"]) for e in errors] == [("p3-q0", "rewards", FAIL)]
    assert counts == {"prompts": 6, "questions": 7, "answers": 12, "pairs": 5, "dropped": {"identical": 1},
                      "errors": 1, "duplicates_skipped": 1}

    full, full_counts = rebuilt(tmp_path, out)
    assert counts == full_counts
    for v in ("pairs", "candidates", "errors"):
        assert view_rows(out, v) == view_rows(full, v), v
    settled = {v: file_stats(out, v) for v in views.VIEWS}
    assert finalize(out, 2) == counts  # nothing new: nothing is rewritten
    assert {v: file_stats(out, v) for v in views.VIEWS} == settled


def test_a_resume_over_views_of_the_old_layout_rebuilds_them_once(tmp_path, shards):
    """Views without a state file (written before folds were incremental) are replaced by a full fold."""
    out = tmp_path / "run"
    write_shard(out / "scored", 0, shards[0])
    (out / "pairs").mkdir(parents=True)
    pq.write_table(shards[1].select(["pair_key"]), out / "pairs" / "part-00000.parquet")  # stale rows
    finalize(out, 2)
    assert [r["pair_id"] for r in view_rows(out, "pairs")] == ["p1-q0"]


@pytest.mark.parametrize("kill_at", ["before_commit", "after_commit"])
@pytest.mark.parametrize("fold", ["first", "resume"])
def test_a_finalize_killed_midway_leaves_consistent_views(tmp_path, shards, monkeypatch, kill_at, fold):
    out = tmp_path / "run"
    write_shard(out / "scored", 0, shards[0])
    write_shard(out / "scored", 1, shards[1])
    if fold == "resume":
        finalize(out, 2)
    old = {v: view_rows(out, v) if (out / v).is_dir() else [] for v in views.VIEWS}
    write_shard(out / "scored", 2, shards[2])

    class Killed(BaseException):
        pass
    commit, roll = views._commit, views._roll_forward

    def commit_then_die(o, state):
        if kill_at == "before_commit" and state["pending"]:
            raise Killed
        commit(o, state)

    def roll_then_die(o, state):
        if kill_at == "after_commit" and state.get("pending"):
            raise Killed  # the state names the renames to do; none is done yet
        roll(o, state)
    with monkeypatch.context() as m:
        m.setattr(views, "_commit", commit_then_die)
        m.setattr(views, "_roll_forward", roll_then_die)
        with pytest.raises(Killed):
            finalize(out, 2)
    # A reader now sees the old views (none before a first fold), whole: new files have temporary names only.
    for v in views.VIEWS:
        assert (view_rows(out, v) if (out / v).is_dir() else []) == old[v]
    assert any(f.name.startswith(".") for f in out.rglob("*") if "scored" not in f.parts)

    counts = finalize(out, 2)
    full, full_counts = rebuilt(tmp_path, out)
    assert counts == full_counts
    for v in views.VIEWS:
        assert view_rows(out, v) == view_rows(full, v), v
    assert not [f for v in ("pairs", "candidates") for f in (out / v).iterdir() if f.name.startswith(".")]
    assert not [d for d in os.listdir(out) if ".tmp-" in d or ".old-" in d]


def done_by_scanning(scored: Path, expected: dict) -> set:
    """done_prompts as it was: every good row of every shard, distinct keys per prompt, in Python sets."""
    seen: dict = {}
    for f in sorted(scored.glob("shard-*.parquet")):
        for r in pq.read_table(f, columns=["prompt_id", "pair_key", "error"]).to_pylist():
            if r["error"] is None:
                seen.setdefault(r["prompt_id"], set()).add(r["pair_key"])
    return {p for p, keys in seen.items() if len(keys) >= expected.get(p, 1 << 30)}


def test_done_prompts_reads_the_key_index_for_folded_shards_and_equals_a_full_scan(tmp_path, shards, monkeypatch):
    from pipelines.generate import outputs
    expected = {"p1": 1, "p2": 1, "p3": 2, "p4": 1, "p5": 1, "p6": 1, "p9": 1}   # p3: q0 never succeeds
    out = tmp_path / "run"
    assert outputs.done_prompts(out / "scored", expected) == set()            # nothing written yet
    write_shard(out / "scored", 0, shards[0])
    write_shard(out / "scored", 1, shards[1])
    assert outputs.done_prompts(out / "scored", expected) == {"p1", "p4", "p5"} == done_by_scanning(
        out / "scored", expected)
    finalize(out, 2)
    write_shard(out / "scored", 2, shards[2])    # written by a run that was killed before its finalize
    read = []
    monkeypatch.setattr(outputs, "read_shard", lambda f, cols=None: read.append(Path(f).name) or pq.read_table(
        f, columns=cols))
    done = outputs.done_prompts(out / "scored", expected)
    assert done == {"p1", "p2", "p4", "p5", "p6"} == done_by_scanning(out / "scored", expected)
    # the folded shards were not read: their key index was, and the unfolded shard
    assert sorted(read) == ["keys-00000.parquet", "shard-00000000000000000002-x.parquet"]
    (out / views.STATE_DIR / "state.json").unlink()     # no usable index: every shard is scanned, same answer
    read.clear()
    assert outputs.done_prompts(out / "scored", expected) == done and len(read) == 3
