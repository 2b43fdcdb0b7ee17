"""`synthalign submit` / `synthalign jobs` against a real Ray head started with `ray start` and token auth.

The head is private to this module: its own temp dir, free ports, every port on 127.0.0.1, a token made
up for the test (never the user's ~/.ray/auth_token). The CLI runs as a subprocess with a clean
environment and an empty HOME, so the only token it can find is the one a test hands it.
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT

from tests.multinode import free_ports, session_pids, stop_group

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CLEAN = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


@pytest.fixture(scope="module")
def head():
    # Short path: Ray's unix sockets live under it (limit ~107 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="sa-head-", dir="/tmp"))
    token = secrets.token_hex(32)
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = free_ports(9)
    workers = random.randrange(30000, 32600, 100)  # below Linux's ephemeral range (32768+)
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,  # Ray 2.60 `ray start`: token only when asked
        # Linux only: Ray otherwise swaps --node-ip-address=127.0.0.1 for the machine's IP and binds the
        # GCS, raylet and Ray Client server there; this keeps every port of this test head on loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM tears down at once, no 30 s drain
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job runs `synthalign` from here
    })
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={tmp}", "--num-cpus=2",
           "--include-dashboard=true", f"--ray-client-server-port={client}",
           f"--min-worker-port={workers}", f"--max-worker-port={workers + 99}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", "--disable-usage-stats"]
    log = open(tmp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:  # public (unauthenticated) endpoints
                urllib.request.urlopen(f"{address}/api/gcs_healthz", timeout=2).read()
                mode = json.loads(urllib.request.urlopen(f"{address}/api/authentication_mode", timeout=2).read())
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray start failed:\n" + (tmp / "ray-start.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"address": address, "token": token, "tmp": tmp, "pid": proc.pid, "gcs": f"127.0.0.1:{gcs}",
               "auth_mode": mode["authentication_mode"]}
    finally:
        stop_group(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def cli(args: list[str], home: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update({"HOME": str(home), **env_extra})
    return subprocess.run([str(BIN / "synthalign"), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


# --- no head needed ---------------------------------------------------------------------------------

def test_addresses_entrypoints_and_runtime_env():
    from actors.common.errors import InputError
    from cluster import submit as jobs
    assert jobs.normalize_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"
    for bad in ("ray://head:10001", "auto", ""):
        with pytest.raises(InputError):
            jobs.normalize_address(bad)
    entry = jobs.entrypoint_for(["synthalign", "generate", "configs/tiny.yaml", "--set", "images.guidance_scales=[5, 7]"])
    assert entry == "synthalign generate configs/tiny.yaml --set 'images.guidance_scales=[5, 7]'"
    env = jobs.runtime_env(ROOT, {"A": 1}, ["six"])
    assert env["working_dir"] == str(ROOT) and env["env_vars"] == {"A": "1"} and env["pip"] == ["six"]
    assert {".git", ".venv", "runs", ".synthalign", "__pycache__", "*.parquet", ".pytest_cache"} <= set(env["excludes"])
    with pytest.raises(InputError, match="RAY_AUTH_TOKEN: not passed to jobs"):
        jobs.runtime_env(ROOT, {"RAY_AUTH_TOKEN": "x"})


def test_forwarded_credentials_are_values_and_shown_by_name_only(monkeypatch):
    from cluster import connect
    from cluster import submit as jobs
    for name in connect.FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-" + "7" * 20)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/home/me/gcp.json")  # a file: the job's node lacks it
    assert connect.worker_env() == {"WANDB_API_KEY": "wandb-" + "7" * 20, "AWS_REGION": "eu-west-3"}
    assert jobs.redact("key wandb-77777777777777777777 in eu-west-3") == "key <WANDB_API_KEY> in <AWS_REGION>"


def test_config_must_be_inside_the_uploaded_folder(tmp_path):
    from actors.common.errors import InputError
    from pipelines.cli.cluster import config_in_project
    assert config_in_project(str(ROOT / "configs" / "tiny.yaml"), ROOT) == "configs/tiny.yaml"
    (tmp_path / "c.yaml").write_text("output_dir: x\n")
    with pytest.raises(InputError, match="outside the project folder"):
        config_in_project(str(tmp_path / "c.yaml"), ROOT)


def test_paths_the_job_cannot_see_fail_before_upload(tmp_path):
    from actors.common.errors import InputError
    from pipelines.cli.cluster import check_for_cluster
    from pipelines.config import load_config
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["rewards.synonyms_file=../elsewhere/synonyms.txt"])
    with pytest.raises(InputError, match="rewards.synonyms_file.*outside the project folder"):
        check_for_cluster(cfg, ROOT)
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    with pytest.raises(InputError, match="output_dir.*'runs/tiny' is relative.*s3://"):
        check_for_cluster(cfg, ROOT)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["output_dir=s3://bucket/runs/tiny"])
    assert check_for_cluster(cfg, ROOT) == []
    cfg = load_config(ROOT / "configs" / "paper.yaml", [f"output_dir={tmp_path}"])
    assert check_for_cluster(cfg, ROOT) == []  # deepspeed config inside the project is fine


# --- a real head ---------------------------------------------------------------------------------------

def test_head_binds_loopback_and_enforces_tokens(head):
    assert head["auth_mode"] == "token"
    session = (head["tmp"] / "session_latest").resolve()
    # Every TCP socket the head's processes listen on is on 127.0.0.1.
    inodes = {link[8:-1] for p in session_pids(head["pid"]) for link in _fd_links(p) if link.startswith("socket:[")}
    listening = [line.split() for name in ("tcp", "tcp6") for line in open(f"/proc/net/{name}").readlines()[1:]
                 if line.split()[3] == "0A" and line.split()[9] in inodes]
    assert listening and session.is_dir()
    for fields in listening:
        ip = fields[1].split(":")[0]
        # 127.0.0.1, ::ffff:127.0.0.1 or ::1 as /proc/net prints them
        assert ip in ("0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"), fields


def _fd_links(pid: int) -> list[str]:
    links = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    except OSError:
        pass
    return links


def test_missing_wrong_and_unreachable_give_one_clear_line(head, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = cli(["jobs", "status", "raysubmit_x", "--address", head["address"]], home)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"synthalign: error: {head['address']}: the Ray head requires an auth token: set RAY_AUTH_TOKEN or "
        "RAY_AUTH_TOKEN_PATH, or put the cluster's token in ~/.ray/auth_token (on the head: `ray get-auth-token`)"]
    r = cli(["jobs", "status", "raysubmit_x", "--address", head["address"]], home, RAY_AUTH_TOKEN="0" * 64)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "rejected the auth token from RAY_AUTH_TOKEN: it is not this cluster's token" in r.stderr
    port, = free_ports(1)
    r = cli(["jobs", "status", "raysubmit_x", "--address", f"127.0.0.1:{port}"], home, RAY_AUTH_TOKEN=head["token"])
    assert r.returncode == 2 and "nothing is listening there" in r.stderr and len(r.stderr.splitlines()) == 1
    # The token from a file named by RAY_AUTH_TOKEN_PATH, then from ~/.ray/auth_token: accepted.
    (tmp_path / "tok").write_text(head["token"] + "\n")
    r = cli(["jobs", "status", "raysubmit_x", "--address", head["address"]], home,
            RAY_AUTH_TOKEN_PATH=str(tmp_path / "tok"))
    assert r.returncode == 2 and "no job raysubmit_x on this cluster" in r.stderr, r.stderr
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(head["token"])
    r = cli(["jobs", "status", "raysubmit_x", "--address", head["address"]], home)
    assert "no job raysubmit_x" in r.stderr, r.stderr
    # A submit without a token fails the same way, before anything runs.
    (home / ".ray" / "auth_token").unlink()
    r = cli(["submit", "configs/tiny.yaml", "--address", head["address"], "--job", "generate",
             "--set", "output_dir=s3://bucket/runs/tiny"], home)
    assert r.returncode == 2 and "requires an auth token" in r.stderr


def test_submit_generate_wait_then_status_and_logs(head, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "run"
    t0 = time.time()
    r = cli(["submit", "configs/tiny.yaml", "--address", head["address"], "--job", "generate",
             "--set", "prompts.num_prompts=2", "--set", f"output_dir={out}",
             "--env", "SYNTHALIGN_TEST=1", "--wait"],
            home, RAY_AUTH_TOKEN=head["token"])
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert head["token"] not in r.stdout + r.stderr
    job_id = re.search(r"^submitted (raysubmit_\w+): synthalign generate configs/tiny.yaml", r.stdout, re.M)[1]
    assert f"dashboard: {head['address']}/#/jobs/{job_id}" in r.stdout
    assert re.search(r"^pairs: \d+ of 4 image-questions", r.stdout, re.M)
    assert r.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["questions"] == 4
    assert list((out / "pairs").glob("*.parquet"))
    print(f"submit --wait took {elapsed:.0f} s")

    r = cli(["jobs", "status", job_id, "--address", head["address"]], home, RAY_AUTH_TOKEN=head["token"])
    assert r.returncode == 0 and r.stdout.startswith(f"{job_id}: SUCCEEDED")
    r = cli(["jobs", "logs", job_id, "--address", head["address"]], home, RAY_AUTH_TOKEN=head["token"])
    assert r.returncode == 0 and "pairs: " in r.stdout and head["token"] not in r.stdout
    r = cli(["jobs", "stop", job_id, "--address", head["address"]], home, RAY_AUTH_TOKEN=head["token"])
    assert r.returncode == 0 and r.stdout.strip() == f"{job_id}: already ended"


# Put in the job's working_dir: Ray puts that folder on every job process's PYTHONPATH, so each Python process
# of the job (driver, supervisor, every Ray worker) records a hash of the credentials it was started with.
PROBE = """\
import hashlib, json, os, sys
if os.environ.get("SA_PROBE_DIR"):
    seen = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in os.environ.items() if k in %r}
    with open(os.path.join(os.environ["SA_PROBE_DIR"], "%%d.json" %% os.getpid()), "w") as f:
        json.dump({"argv0": os.path.basename(sys.argv[0]), "job": os.environ.get("RAY_JOB_ID"), "seen": seen}, f)
"""


def test_credentials_in_the_shell_reach_the_jobs_workers_and_are_never_printed(head, tmp_path):
    """The head was started without them; a real generate job gets them from the submitting shell, succeeds, and
    neither `submit --wait` nor `jobs logs` shows a value."""
    import hashlib
    creds = {"HF_TOKEN": "hf_" + secrets.token_hex(8), "WANDB_API_KEY": secrets.token_hex(20),
             "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper()}
    home, wd, probe = tmp_path / "home", tmp_path / "wd", tmp_path / "probe"
    for d in (home, wd / "configs", probe):
        d.mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "tiny.yaml", wd / "configs")
    (wd / "sitecustomize.py").write_text(PROBE % (tuple(creds),))
    r = cli(["submit", str(wd / "configs" / "tiny.yaml"), "--working-dir", str(wd), "--address", head["address"],
             "--job", "generate", "--set", "prompts.num_prompts=2", "--set", f"output_dir={tmp_path / 'run'}",
             "--env", f"SA_PROBE_DIR={probe}", "--wait"],
            home, RAY_AUTH_TOKEN=head["token"], **creds)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = re.search(r"^submitted (raysubmit_\w+)", r.stdout, re.M)[1]
    assert r.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    note = re.search(r"^synthalign: note: passing (.*) from this shell to the job \(value not shown\)$", r.stderr, re.M)
    assert note and set(creds) <= set(note[1].split(", ")), r.stderr
    # Nothing was there to hide: no value, and no value replaced by its name.
    for name, value in creds.items():
        assert value not in r.stdout + r.stderr and f"<{name}>" not in r.stdout + r.stderr, name
    want = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in creds.items()}
    records = [json.loads(f.read_text()) for f in probe.glob("*.json")]
    workers = [rec for rec in records if rec["argv0"] == "default_worker.py"]
    # The job supervisor runs under the dashboard's Ray job; the generate job's own workers under another.
    assert len({rec["job"] for rec in workers}) >= 2, records
    assert all(rec["seen"] == want for rec in workers), records
    # From a shell without the credentials (nothing to redact with): the job's own output has no value either.
    r = cli(["jobs", "logs", job_id, "--address", head["address"]], home, RAY_AUTH_TOKEN=head["token"])
    assert r.returncode == 0 and "pairs: " in r.stdout
    assert not any(value in r.stdout + r.stderr for value in creds.values())


def test_hf_token_reaches_workers_on_another_node_and_is_never_printed(head, tmp_path):
    """The head was started without HF_TOKEN; a driver that has it attaches, and its workers on the head see it."""
    secret = "hf_" + secrets.token_hex(8)
    script = ("import os, ray\n"
              "from cluster.connect import connect\n"
              f"connect({head['gcs']!r})\n"
              "same = ray.get(ray.remote(lambda: os.environ.get('HF_TOKEN')).options(num_cpus=0).remote())\n"
              f"print('same' if same == {secret!r} else 'different')\n")
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    # As the head: without it Ray swaps 127.0.0.1 for the machine's IP and the driver waits for a node there.
    env.update({"HF_TOKEN": secret, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head["token"],
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "same"
    assert secret not in r.stdout + r.stderr
