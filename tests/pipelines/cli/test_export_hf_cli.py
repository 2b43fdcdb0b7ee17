"""`synthalign export RUN --format hf` as a user meets it: exit 0 and the folder's path, or one line and exit 2 with
nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "pipelines" / "train"))
from train_fixtures import make_pairs_parquet  # noqa: E402


def synthalign(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": "", **(env or {})})


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("synthalign: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def fake_run(root: Path, n: int = 8) -> Path:
    make_pairs_parquet(root / "pairs", n=n, files=2)
    (root / "manifest.json").write_text(json.dumps({"data_hash": "abc", "counts": {"pairs": n}, "config": {}}))
    return root


def test_export_hf_exits_0_and_prints_the_folder(tmp_path):
    run, out = fake_run(tmp_path / "run"), tmp_path / "out"
    proc = synthalign("export", run, "--format", "hf", "--out", out, "--test-fraction", "0.25", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert pads.dataset(str(out / "data"), format="parquet").count_rows() == 8
    assert (out / "README.md").read_text().startswith("---\n")
    assert sorted(p.name for p in (out / "data").iterdir()) == ["test-00000-of-00001.parquet",
                                                                 "train-00000-of-00001.parquet"]


def test_folder_without_pairs_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "notarun").mkdir()
    proc = synthalign("export", tmp_path / "notarun", "--format", "hf", "--out", tmp_path / "out")
    assert_one_line_error(proc, str(tmp_path / "notarun"), "not a run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notarun"]
    assert not any((tmp_path / "notarun").iterdir())


def test_flags_and_hub_checked_before_anything_is_written(tmp_path):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "out"
    assert_one_line_error(synthalign("export", run, "--format", "hf", "--out", out, "--private"),
                          "--private goes with --push-to-hub")
    no_login = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")}
    assert_one_line_error(synthalign("export", run, "--format", "hf", "--out", out, "--push-to-hub", "me/pairs",
                                     env=no_login), "no Hugging Face token")
    assert not out.exists() and not (run / "export").exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(synthalign("export", run, "--format", "hf", "--out", out), str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
