"""One run per output_dir (a flock locally, a lease on object storage), and local runs side by side on one
machine, each with a Ray and a dashboard of its own."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, tiny_yaml

from actors.common.errors import InputError
from cluster.storage import Location
from pipelines.lock import RunLock

HOLD = ("import sys, time\nfrom pipelines.lock import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n")


def hold(folder, seconds: float) -> subprocess.Popen:
    """Another process holding the folder for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    return proc


def cli(args: list[str], cwd, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_second_run_on_a_busy_folder_refuses_in_one_line_naming_the_first(tiny_models, tmp_path):
    out = tmp_path / "run"
    holder = hold(out, 60)
    try:
        r = cli(["generate", tiny_yaml(tiny_models, tmp_path, str(out))], tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and f"pid {holder.pid}" in line and "--wait-for-lock" in line, line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]   # nothing written
    finally:
        holder.kill()
        holder.wait()
    with RunLock(out):          # the kernel released the lock of the killed holder
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()


def test_wait_for_lock_waits_until_the_holder_ends(tmp_path):
    holder = hold(tmp_path / "run", 3)
    t0 = time.time()
    with RunLock(tmp_path / "run", wait=True):
        waited = time.time() - t0
    holder.wait()
    assert waited >= 1.5, waited


def test_a_lease_on_object_storage_refuses_a_second_run_and_expires(s3_server, bucket, monkeypatch):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    uri = f"{bucket}/run"
    with RunLock(uri):
        lease = json.loads(Location(f"{uri}/.lock.json").read_text())
        assert lease["pid"] == os.getpid() and lease["expires"] > time.time()
        with pytest.raises(InputError, match=rf"in use by another run \(pid {os.getpid()}"):
            with RunLock(uri):
                pass
    assert not Location(f"{uri}/.lock.json").exists()     # released
    # A crashed run's lease: taken over once expired, never before.
    Location(f"{uri}/.lock.json").write_text(json.dumps({"owner": "x", "pid": 1, "expires": time.time() + 2}))
    with pytest.raises(InputError):
        with RunLock(uri):
            pass
    time.sleep(2.5)
    with RunLock(uri) as lock:
        assert json.loads(Location(f"{uri}/.lock.json").read_text())["owner"] == lock.owner


@pytest.mark.slow
def test_two_local_runs_started_a_second_apart_both_finish(tiny_models, tmp_path):
    procs = []
    for name in ("a", "b"):
        config = tiny_yaml(tiny_models, tmp_path, str(tmp_path / name), prompts={"num_prompts": 2})
        procs.append(subprocess.Popen([sys.executable, "-m", "pipelines.cli", "generate", config], cwd=tmp_path,
                                      env={k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(1)
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in results]
    urls = [re.search(r"dashboard (http://127\.0\.0\.1:\d+)", err)[1] for _, err in results]
    assert urls[0] != urls[1]
    for name in ("a", "b"):
        assert json.loads((tmp_path / name / "manifest.json").read_text())["status"] == "complete"
