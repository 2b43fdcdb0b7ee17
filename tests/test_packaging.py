"""The wheel holds every subpackage and data file, and the CLI works from it alone: installed into a fresh
venv, run from a folder outside the repository, with no editable install in sight."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from test_fresh_clone import copy_git_files

PACKAGES = ("actors", "cluster", "pipelines")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from the repository's files as git sees them (an in-tree build would reuse a stale build/)."""
    tmp = tmp_path_factory.mktemp("wheel")
    copy_git_files(ROOT, tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(tmp / "src")], check=True, capture_output=True)
    [whl] = (tmp / "dist").glob("synthalign-*.whl")
    return whl


def expected_files() -> set[str]:
    """Every module of every package in the source tree, and every file pyproject's package-data names."""
    files = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for pkg, patterns in package_data.items():
        files |= {p.relative_to(ROOT).as_posix() for pattern in patterns for p in (ROOT / pkg).glob(pattern)}
    return files


def test_wheel_holds_every_subpackage_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    subpackages = {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
                   for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    assert {"actors.common", "pipelines.evaluate", "pipelines.generate", "pipelines.cli"} <= subpackages
    assert {s.replace(".", "/") + "/__init__.py" for s in subpackages} <= names
    assert "actors/common/data/synonyms_refine.txt" in expected_files()
    assert sorted(expected_files() - names) == []
    assert {n.split("/")[0] for n in names} == {*PACKAGES, "synthalign-0.1.0.dist-info"}   # no tests/, configs/


def test_installed_wheel_runs_outside_the_repo(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    # The test venv's third-party packages, without its editable install: a path listed in a .pth file is
    # put on sys.path, but the .pth files inside it (the editable finder's) are not run.
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}

    def run(*args):
        return subprocess.run(list(map(str, args)), cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run(py, "-c", "import pipelines, actors.common.objects as o; "
                          "print(pipelines.__file__); print(len(o.ObjectVocab.from_file(o.COCO_SYNONYMS).classes))")
    assert where.returncode == 0, where.stderr
    init, n_classes = where.stdout.split()
    assert Path(init) == site / "pipelines" / "__init__.py" and n_classes == "80"

    helped = run(venv / "bin" / "synthalign", "--help")
    assert helped.returncode == 0, helped.stderr
    assert all(cmd in helped.stdout for cmd in ("generate", "train", "eval", "export"))

    labels, answers = ["yes", "yes", "yes", "no"], ["Yes", "Yes, there is.", "No, there is not.", "yes"]
    (work / "q.jsonl").write_text("".join(json.dumps({"question_id": i, "image": f"{i}.jpg", "label": lab,
                                                      "text": "Is there a cat in the image?"}) + "\n"
                                          for i, lab in enumerate(labels)))
    (work / "a.jsonl").write_text("".join(json.dumps({"question_id": i, "text": a}) + "\n"
                                          for i, a in enumerate(answers)))
    scored = run(venv / "bin" / "synthalign", "eval", "pope-score", "--questions", "q.jsonl",
                 "--answers", "a.jsonl", "--json")
    assert scored.returncode == 0, scored.stderr
    m = json.loads(scored.stdout)   # TP 2, FN 1, FP 1, TN 0
    assert m["n"] == 4 and m["accuracy"] == pytest.approx(0.5) and m["yes_ratio"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
