"""A write that finds no space (ENOSPC) leaves no temporary file and the previous file whole, in every writer of a
generate run: a scored shard (the sink), a view part, the key index, the views' state, the manifest. The error
names the file; `no_space` finds it behind Ray's wrapping."""
from __future__ import annotations

import errno
import json
import pathlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_views import SHARDS, rebuilt, scored_shard, view_rows, write_shard

import pipelines.generate.views as views
from cluster.storage import Location, write_table
from pipelines.generate.outputs import finalize


def full_disk(write_some):
    """A writer that puts some bytes down (as a write cut short does), then finds the disk full."""
    def fake(*args, **kwargs):
        write_some(*args)
        raise OSError(errno.ENOSPC, "No space left on device")
    return fake


def half_parquet(table, where, *a):
    Path(where).write_bytes(b"PAR1 half a file")


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_write_table_out_of_space_removes_its_temporary_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "part-00000.parquet"
    write_table(pa.table({"x": [1, 2, 3]}), Location(path))
    monkeypatch.setattr(pq, "write_table", full_disk(half_parquet))
    with pytest.raises(OSError) as e:
        write_table(pa.table({"x": [4]}), Location(path))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)   # the one line can say where
    assert listing(tmp_path) == ["part-00000.parquet"]   # no .part-00000.parquet.tmp
    monkeypatch.undo()
    assert pq.read_table(path).column("x").to_pylist() == [1, 2, 3]


def test_a_manifest_write_out_of_space_keeps_the_old_manifest(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    Location(path).write_text(json.dumps({"status": "running"}))
    real = pathlib.Path.write_bytes
    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk(lambda p, data: real(p, data[:5])))
    with pytest.raises(OSError) as e:
        Location(path).write_text(json.dumps({"status": "failed", "reason": "disk full"}))
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert listing(tmp_path) == ["manifest.json"]
    assert json.loads(path.read_text()) == {"status": "running"}


def test_the_sink_out_of_space_leaves_only_whole_shards(tmp_path, monkeypatch):
    from pipelines.generate.sink import AtomicParquetSink
    sink = AtomicParquetSink(str(tmp_path / "scored"), 2)
    sink.on_write_start()
    assert sink.write([pa.table({"pair_key": ["a-q0", "b-q0"]})], None) == 2
    monkeypatch.setattr(pq, "write_table", full_disk(half_parquet))
    with pytest.raises(OSError) as e:
        sink.write([pa.table({"pair_key": ["c-q0", "d-q0"]})], None)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and Path(e.value.filename).parent == tmp_path / "scored"
    files = listing(tmp_path / "scored")
    assert len(files) == 1 and files[0].startswith("shard-")   # the first shard only, no .shard-*.tmp
    assert pq.read_table(tmp_path / "scored" / files[0]).column("pair_key").to_pylist() == ["a-q0", "b-q0"]


@pytest.fixture
def shards(coco_vocab):
    return [scored_shard(coco_vocab, rows) for rows in SHARDS]


# The writes of a resume's fold, in order: pairs part, candidates part, errors view, key index (Parquet files
# through cluster.storage.write_table), then the state file (the commit).
@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, "commit"])
def test_a_fold_out_of_space_leaves_the_old_views_and_state_and_no_temporary_file(tmp_path, shards, monkeypatch,
                                                                                fail_at):
    out = tmp_path / "run"
    write_shard(out / "scored", 0, shards[0])
    write_shard(out / "scored", 1, shards[1])
    finalize(out, 2)
    before = listing(out)
    old = {v: view_rows(out, v) for v in views.VIEWS}
    state = (out / ".views" / "state.json").read_bytes()
    write_shard(out / "scored", 2, shards[2])
    before.append("scored/" + sorted((out / "scored").glob("shard-*"))[-1].name)

    calls = []
    real_write, real_commit = pq.write_table, views._commit

    def write(table, where, *a, **k):   # under cluster.storage.write_table: its temporary file gets half a file
        calls.append(Path(where).name)
        if len(calls) == fail_at:
            return full_disk(half_parquet)(table, where)
        return real_write(table, where, *a, **k)

    def commit(o, st):
        if fail_at == "commit" and st.get("pending"):
            raise OSError(errno.ENOSPC, "No space left on device", str(o / ".views" / "state.json"))
        real_commit(o, st)
    monkeypatch.setattr(pq, "write_table", write)
    monkeypatch.setattr(views, "_commit", commit)
    with pytest.raises(OSError) as e:
        finalize(out, 2)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert len(calls) == (4 if fail_at == "commit" else fail_at)   # the write meant failed
    assert [c.lstrip(".").split("-")[0] for c in calls] == ["part", "part", "part", "keys"][:len(calls)]
    assert listing(out) == sorted(before)   # no temporary part, no orphan key index, nothing else new
    assert (out / ".views" / "state.json").read_bytes() == state
    assert {v: view_rows(out, v) for v in views.VIEWS} == old

    # Space back: the next fold equals a rebuild from scratch.
    counts = finalize(out, 2)
    full, full_counts = rebuilt(tmp_path, out)
    assert counts == full_counts
    for v in views.VIEWS:
        assert view_rows(out, v) == view_rows(full, v), v


def test_no_space_is_found_behind_rays_wrapping_with_its_file_name(tmp_path, monkeypatch):
    import pickle

    from ray.exceptions import RayTaskError

    from pipelines.generate.job import no_space
    path = tmp_path / "scored" / "shard-1.parquet"
    monkeypatch.setattr(pq, "write_table", full_disk(half_parquet))
    with pytest.raises(OSError) as e:
        write_table(pa.table({"x": [1]}), Location(path))
    cause = e.value
    cause.args = (*cause.args, "Failed to apply UDF transform after 1/1 attempts.")   # as Ray Data annotates it
    cause = pickle.loads(pickle.dumps(cause))   # as the task's error travels to the driver
    wrapped = RayTaskError("write", "Traceback ...", cause).as_instanceof_cause()
    try:
        try:
            raise wrapped
        except Exception as inner:
            raise RuntimeError("Write failed") from inner
    except RuntimeError as outer:
        found = no_space(outer)
    assert found is not None and found.errno == errno.ENOSPC and found.filename == str(path)
    assert no_space(RuntimeError("x")) is None
    assert no_space(OSError(errno.EACCES, "Permission denied")) is None
    assert no_space(OSError(errno.EDQUOT, "Disk quota exceeded")).errno == errno.EDQUOT
