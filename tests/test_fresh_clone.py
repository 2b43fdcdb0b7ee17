"""The repository stands alone: its files as git sees them, copied into an empty folder, run the demo's
generation there. A file outside the copy (a folder beside the repo, or the original checkout through the editable
install) would be missing there or is caught by an audit hook in every Python process of the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

# Imported by every Python process of the run (driver, Ray workers) through PYTHONPATH: logs each opened
# file that lies beside the copy or beside the original checkout (but not in the venv or the copy itself),
# and each of the copy's modules a process loads, with its pid.
GUARD = '''
import os, sys
DENY, ALLOW, COPY, LOG = {deny!r}, {allow!r}, {copy!r}, {log!r}
_busy = False

def _hook(event, args):
    global _busy
    if event != "open" or _busy or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    under = lambda roots: any(path == r or path.startswith(r + os.sep) for r in roots)
    kind = "code" if under([COPY]) and path.endswith((".py", ".pyc")) else \\
        "outside" if under(DENY) and not under(ALLOW) else None
    if kind:
        _busy = True
        try:
            with open(LOG, "a") as f:
                f.write(f"{{kind}} {{os.getpid()}} {{path}}\\n")
        finally:
            _busy = False

sys.addaudithook(_hook)
'''


def copy_git_files(root: Path, dest: Path) -> None:
    """The files git sees (tracked, and untracked but not ignored, so uncommitted work is tested too)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    for f in out.split("\0"):
        if f and (root / f).is_file():   # a deleted file is still "cached"
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            (dest / f).write_bytes((root / f).read_bytes())


def test_generate_in_a_lone_copy(tmp_path):
    copy, guard = tmp_path / "synthalign", tmp_path / "guard"
    copy_git_files(ROOT, copy)
    guard.mkdir()
    log = guard / "opened.log"
    (guard / "sitecustomize.py").write_text(GUARD.format(
        deny=[str(ROOT.parent), str(tmp_path)], allow=[str(copy), str(guard), sys.prefix, sys.base_prefix],
        copy=str(copy), log=str(log)))
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": f"{copy}{os.pathsep}{guard}"}

    which = subprocess.run([sys.executable, "-c", "import pipelines, sitecustomize; print(pipelines.__file__)"],
                           cwd=copy, env=env, capture_output=True, text=True, check=True)
    assert which.stdout.strip() == str(copy / "pipelines" / "__init__.py")

    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "generate", "configs/tiny.yaml",
                             "--set", "prompts.num_prompts=2", "--set", "prompts.instructions_per_prompt=1",
                             "--set", "output_dir=runs/fresh"],
                            cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-4000:]
    assert (copy / ".synthalign" / "tiny" / "llava" / "config.json").is_file()  # tiny_models built in the copy
    manifest = json.loads((copy / "runs" / "fresh" / "manifest.json").read_text())
    pairs = pq.read_table(copy / "runs" / "fresh" / "pairs")
    assert manifest["status"] == "complete" and manifest["counts"]["errors"] == 0
    assert pairs.num_rows > 0 and pairs.num_rows == manifest["counts"]["pairs"]

    lines = [ln.split(" ", 2) for ln in log.read_text().splitlines()]
    assert [path for kind, _, path in lines if kind == "outside"] == []
    # The guard ran in the Ray workers too: some other process loaded the copy's stages.
    assert {pid for kind, pid, path in lines if kind == "code" and "/actors/" in path} - {str(proc.pid)}
