"""`synthalign generate` on a disk that fills up: one line saying what was written and where, the failure in the
manifest, only whole shards, and the same command resumes to the pairs of an uninterrupted run.

The disk is a small tmpfs mounted for the test. It is mounted in this machine's mount namespace, not a private
one (`unshare -m`, as tests/multinode.py does for a worker node): the shards are written by Ray worker processes,
which would not see a mount private to the test. The runs on the small disk are the CLI in a process of its own
(as a user runs it, with a local Ray): a failed Ray Data run in this process could keep its pool's actors alive.
Ray's temp and spill folders stay in /tmp/ray, off the small disk.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, tiny_yaml

N_PROMPTS = 6
# Diffusers calls of one image make blocks of one prompt, so the stream writes several shards.
SECTIONS = {"prompts": {"num_prompts": N_PROMPTS}, "images": {"batch_size": 1}, "rows_per_shard": 2,
            "pools": {"images": {"batch_size": 1}, "selection": {"batch_size": 1}, "sampling": {"batch_size": 2},
                      "rewards": {"batch_size": 2}}}
LINE = re.compile(r"synthalign: failed: disk full writing (\S+): (\d+) shards, (\d+) pairs written to (\S+); "
                  r"free space and run the same command to resume")


def mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `where`; returns why it cannot be done here, or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (mount -t tmpfs); not root here"
    if not shutil.which("mount"):
        return "`mount` is not installed"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    return f"mount -t tmpfs is not permitted here: {r.stderr.strip()[-300:]}" if r.returncode else None


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes free on `disk`."""
    st = os.statvfs(disk)
    ballast = disk / f"ballast-{len(list(disk.glob('ballast-*')))}"
    ballast.write_bytes(os.urandom(st.f_bavail * st.f_frsize - leave))
    return ballast


def generate(config: str) -> tuple[int, list[str]]:
    """`synthalign generate CONFIG` in a process of its own: its exit code and its `synthalign:` lines."""
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", config], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "RAY_ADDRESS": ""})
    return r.returncode, [line for line in r.stderr.splitlines() if line.startswith("synthalign:")]


def pairs_by_id(out: Path) -> dict[str, dict]:
    """Every pair's row but `stage_nodes` (the node ids of the Ray session that made it)."""
    return {r["pair_id"]: r for f in sorted((out / "pairs").glob("*.parquet"))
            for r in pq.read_table(f).drop_columns(["stage_nodes"]).to_pylist()}


def test_a_full_disk_ends_the_run_in_one_line_and_the_same_command_resumes(tiny_models, ray_local, tmp_path):
    from pipelines.cli import main
    from pipelines.generate.job import RESERVE_BYTES
    disk = tmp_path / "disk"
    disk.mkdir()
    if reason := mount_tmpfs(disk, "4m"):
        pytest.skip(reason)
    try:
        reference = tiny_yaml(tiny_models, tmp_path, str(tmp_path / "reference"), **SECTIONS)
        assert main(["generate", reference]) == 0   # uninterrupted, on a disk with room
        expected = pairs_by_id(tmp_path / "reference")

        out = disk / "run"
        config = tiny_yaml(tiny_models, tmp_path, str(out), **SECTIONS)
        # Room for the manifest, the reserve, the actors' start records and about half the shards: a later one fails.
        sizes = [f.stat().st_size for f in (tmp_path / "reference" / "scored").glob("shard-*.parquet")]
        ballast = fill(disk, RESERVE_BYTES + (32 << 10) + sum(sizes) // 2)
        rc, said = generate(config)
        assert rc == 1 and len(said) == 1, said
        m = LINE.fullmatch(said[0])
        assert m, said[0]
        assert m[1].startswith(f"{out}/") and m[4] == str(out)   # the file whose write failed, the run folder

        shards = sorted((out / "scored").glob("shard-*.parquet"))
        rows = [r for f in shards for r in pq.read_table(f).to_pylist()]   # each whole: pyarrow reads it
        kept = {r["pair_key"] for r in rows if r["error"] is None and r["drop_reason"] is None}
        assert int(m[2]) == len(shards) and int(m[3]) == len(kept)
        assert 0 < len(rows) < N_PROMPTS * 2, (said[0], sizes)   # stopped partway
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]   # no temporary file left
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "failed" and manifest["reason"] == said[0].removeprefix("synthalign: failed: ")

        # No room for the manifest: the line says so and the last manifest stays whole.
        last = (out / "manifest.json").read_bytes()
        rest = fill(disk, 4 << 10)   # a page: the empty file that checks the folder is writable fits
        rc, said = generate(config)
        assert rc == 1 and len(said) == 1 and said[0].endswith("; manifest.json not updated (it keeps its last whole version)")
        assert LINE.match(said[0]) and (out / "manifest.json").read_bytes() == last
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        rest.unlink()

        ballast.unlink()   # space back: the same command goes on
        rc, said = generate(config)
        assert rc == 0, said
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["counts"]["prompts_resumed"] > 0
        assert not (out / ".reserve").exists()   # the room held for a failure record is given back
        got = pairs_by_id(out)
        assert sorted(got) == sorted(expected)
        for pair_id, row in expected.items():   # the same bytes, pair by pair
            assert got[pair_id] == row, pair_id
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
