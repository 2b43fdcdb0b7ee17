"""A run's status as users read it: a `running` manifest whose folder no live run holds (the driver was killed
with kill -9, its node lost) reads `interrupted`, in RunFolder.status() and in the report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from actors.common.errors import InputError
from pipelines import lock
from pipelines.folder import RunFolder
from pipelines.lock import RunLock, is_held
from pipelines.report.report import write_report

HOLD = ("import sys, time\nfrom pipelines.lock import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


def running_manifest(folder, status: str = "running"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"status": status, "data_hash": "h", "counts": {}}))


def report_status(folder) -> str:
    md, _ = write_report(str(folder))
    (line,) = [ln for ln in md.read_text().splitlines() if "status **" in ln]
    return line.split("status **")[1].split("**")[0]


def test_running_reads_interrupted_once_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    running_manifest(run)
    assert RunFolder.at(run).status() == "interrupted"        # no lock file at all
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_held(run) and RunFolder.at(run).status() == "running"
        assert report_status(run) == "running"
    finally:
        holder.kill()                                         # SIGKILL: no __exit__, the manifest stays running
        holder.wait()
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    assert not is_held(run) and RunFolder.at(run).status() == "interrupted"
    assert report_status(run) == "interrupted"


def test_a_finished_status_and_a_run_holding_its_own_folder_read_as_written(tmp_path):
    run = tmp_path / "run"
    running_manifest(run, "complete")
    assert RunFolder.at(run).status() == "complete"
    running_manifest(run)
    with RunLock(run):
        assert RunFolder.at(run).status() == "running"        # the run itself (e.g. writing its report)
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()   # the probe left the record alone
    assert RunFolder.at(run).status() == "interrupted"
    assert RunFolder.at(tmp_path / "none").status() is None


def test_a_round_folder_is_held_by_its_run(tmp_path):
    top = tmp_path / "run"
    running_manifest(top, "running round 2")
    running_manifest(top / "rounds" / "2")
    with RunLock(top):
        assert RunFolder.at(top / "rounds" / "2").status() == "running"
        assert RunFolder.at(top).status() == "running round 2"
    assert RunFolder.at(top / "rounds" / "2").status() == "interrupted"
    assert RunFolder.at(top).status() == "interrupted round 2"


def test_an_expired_lease_on_object_storage_reads_interrupted(s3_server, bucket, monkeypatch):
    from cluster.storage import Location
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    uri = f"{bucket}/run"
    Location(f"{uri}/manifest.json").write_text(json.dumps({"status": "running"}))
    lease = Location(f"{uri}/.lock.json")
    lease.write_text(json.dumps({"owner": "x", "pid": 1, "expires": time.time() + 600}))
    assert RunFolder.at(uri).status() == "running"
    lease.write_text(json.dumps({"owner": "x", "pid": 1, "expires": time.time() - 1}))
    assert RunFolder.at(uri).status() == "interrupted"


PROBE = ("import sys, time\nfrom pipelines.lock import is_held\nis_held(sys.argv[1])\nprint('probing', flush=True)\n"
         "end = time.time() + float(sys.argv[2])\nwhile time.time() < end:\n    is_held(sys.argv[1])\n")


@pytest.mark.parametrize("retries", [lock.PROBE_RETRIES, 0])
def test_a_status_probe_never_makes_a_starting_run_see_the_folder_busy(tmp_path, monkeypatch, retries):
    """`report` probing the lock in a loop (another process) while a run takes it, 2,000 times: the probe's
    microsecond shared lock is retried past, never reported as another run. Without the retries it is."""
    monkeypatch.setattr(lock, "PROBE_RETRIES", retries)
    folder = tmp_path / "run"
    with RunLock(folder):
        pass
    probe = subprocess.Popen([sys.executable, "-c", PROBE, str(folder), "60"], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE)
    assert probe.stdout.readline().strip() == "probing"
    busy = 0
    try:
        for _ in range(2000):
            try:
                with RunLock(folder):
                    pass
            except InputError:
                busy += 1
    finally:
        probe.kill()
        probe.wait()
    assert (busy == 0) if retries else (busy > 0)
