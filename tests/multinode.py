"""Session fixtures for multi-node tests: a moto S3 server and a two-node `ray start` cluster on this machine
whose worker node has private folders (its own mount namespace, tmpfs over them), so nothing written
locally on one node can be read on the other; only S3 is shared.

A test drives the cluster from a subprocess (`ray_nodes["run"](code)`), never with an in-process ray.init:
the session's `ray_local` lives in the test process and must not be disturbed.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from benchmarks.nodes import session_pids

BIN = Path(sys.executable).parent
CLEAN = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
         "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    assert not any(10002 <= p <= 19999 for p in ports), ports  # Ray refuses ports inside its worker range
    return ports


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the leader (`ray start --block` then stops its node), then SIGKILL its process group and the
    rest of its session (Ray's workers make groups of their own). SIGTERM to the whole group at once left
    `ray start` hanging. Never `ray stop`: it would kill every Ray on the machine."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        targets = [proc.pid] if sig == signal.SIGTERM else session_pids(proc.pid)
        for pid in targets:
            try:
                os.killpg(pid, sig) if sig == signal.SIGKILL and pid == proc.pid else os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + wait
        while (proc.poll() is None or session_pids(proc.pid)) and time.time() < deadline:
            time.sleep(0.2)
        if proc.poll() is not None and not session_pids(proc.pid):
            break
    proc.wait(timeout=10)


def base_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def wait_for(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.time() + timeout
    while True:
        try:
            if (out := check()) is not None:
                return out
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not come up:\n" + log.read_text()[-3000:])
        time.sleep(0.3)


@pytest.fixture(scope="session")
def s3_server():
    tmp = Path(tempfile.mkdtemp(prefix="sa-s3-", dir="/tmp"))
    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    t0 = time.time()
    with open(tmp / "moto.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=base_env({}),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: urllib.request.urlopen(endpoint, timeout=2).status, "moto_server", proc, tmp / "moto.log")

        def bucket(name: str | None = None) -> str:
            import boto3
            name = name or f"sa-{uuid.uuid4().hex[:12]}"
            boto3.client("s3", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
                         aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
            return f"s3://{name}"

        yield {"endpoint": endpoint, "env": env, "bucket": bucket, "pid": proc.pid, "start_s": time.time() - t0}
    finally:
        stop_group(proc, grace=5)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket: s3://<name>."""
    return s3_server["bucket"]()


def _probe_unshare(d: Path) -> str | None:
    """Why a private mount namespace cannot be made here, or None when it can."""
    if not shutil.which("unshare"):
        return "`unshare` is not installed"
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {d} && touch {d}/x"],
                       capture_output=True, text=True)
    if r.returncode or (d / "x").exists():
        return f"unshare -m + mount -t tmpfs is not permitted or not private here: {r.stderr.strip()[-300:]}"
    return None


def _api(dashboard: str, token: str, path: str):
    req = urllib.request.Request(dashboard + path, headers={"Authorization": f"Bearer {token}"})
    return json.loads(urllib.request.urlopen(req, timeout=5).read())


def alive_nodes(dashboard: str, token: str) -> dict[str, bool]:
    """node_id -> is_head for every ALIVE node, from the dashboard's state API (no ray.init needed)."""
    rows = _api(dashboard, token, "/api/v0/nodes?limit=100")["data"]["result"]["result"]
    return {n["node_id"]: n["is_head_node"] for n in rows if n["state"] == "ALIVE"}


@pytest.fixture(scope="session")
def ray_nodes(s3_server, tmp_path_factory):
    """A head and one worker node, 1 CPU each. Runs go under `root` (the worker sees an empty tmpfs there),
    inputs both nodes must read under `shared`; drivers and CLIs get `env` (token + S3 variables)."""
    base = Path(tempfile.mkdtemp(prefix="sa-mn-", dir="/tmp"))  # short: Ray's socket paths are limited
    root, shared, head_tmp, worker_tmp = (base / d for d in ("root", "shared", "head", "wtmp"))
    for d in (root, shared, head_tmp, worker_tmp):
        d.mkdir()
    if reason := _probe_unshare(root):
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(reason)
    token = secrets.token_hex(32)
    gcs, dash, client, *head_ports = free_ports(8)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **s3_server["env"]}
    node_env = base_env({
        **env,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops a node at once
        # A SIGKILLed node is declared dead in a few seconds instead of ~30.
        "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    })
    dashboard = f"http://127.0.0.1:{dash}"
    worker_ranges = random.sample(range(30000, 32600, 100), 8)  # below the ephemeral range; one per node start

    def node_flags(ports: list[int]) -> list[str]:
        agent, agent_grpc, metrics, rt_env, node_mgr = ports
        lo = worker_ranges.pop()
        return ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=100000000",
                f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}", f"--metrics-export-port={metrics}",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={node_mgr}", "--disable-usage-stats"]

    def launch(cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "a") as f:
            return subprocess.Popen(cmd, env=node_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    times = {"s3_s": s3_server["start_s"]}
    t0 = time.time()
    head = launch([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--temp-dir={head_tmp}",
                   "--include-dashboard=true", *node_flags(head_ports[:5])], base / "head.log")
    state = {"worker": None, "worker_id": None}
    try:
        head_id = wait_for(lambda: next(iter(alive_nodes(dashboard, token)), None), "ray head", head,
                           base / "head.log")
        times["head_s"] = time.time() - t0

        def start_worker() -> str:
            """A fresh worker node in a fresh mount namespace; returns its node id once it is alive."""
            t = time.time()
            # The worker's copies of these are empty tmpfs: root for runs, the head's Ray temp dir and
            # pytest's basetemp, so anything the worker writes locally stays invisible to the head.
            private = [root, head_tmp, worker_tmp, tmp_path_factory.getbasetemp()]
            script = " && ".join(f"mount -t tmpfs tmpfs {d}" for d in private) + " && exec " + " ".join(
                [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={worker_tmp}",
                 *node_flags(free_ports(5)), "--resources='{\"worker_node\": 1}'"])
            old = set(alive_nodes(dashboard, token))
            proc = launch(["unshare", "-m", "sh", "-c", script], base / "worker.log")
            state["worker"] = proc
            state["worker_id"] = wait_for(lambda: next(iter(set(alive_nodes(dashboard, token)) - old), None),
                                          "ray worker node", proc, base / "worker.log")
            times.setdefault("worker_s", time.time() - t)
            return state["worker_id"]

        def kill_worker() -> str:
            """SIGKILL the worker node's whole process group (no clean shutdown); returns its node id."""
            proc = state["worker"]
            os.killpg(proc.pid, signal.SIGKILL)
            stop_group(proc, grace=0)  # stragglers in the session, if any
            return state["worker_id"]

        def run(code: str, timeout: float = 180) -> str:
            """Run `code` as a driver (python -c) with `env`; return its stdout, raise with stderr on failure."""
            r = subprocess.run([sys.executable, "-c", code], env=base_env(env), capture_output=True, text=True,
                               timeout=timeout, cwd=base)
            if r.returncode:
                raise AssertionError(f"driver failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
            return r.stdout

        start_worker()
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": dashboard, "token": token, "env": env, "root": root,
               "shared": shared, "head_node_id": head_id, "worker_node_id": lambda: state["worker_id"],
               "worker_pid": lambda: state["worker"].pid, "kill_worker": kill_worker,
               "start_worker": start_worker, "alive_nodes": lambda: alive_nodes(dashboard, token), "run": run,
               "times": times, "logs": base}
    finally:
        if state["worker"] is not None:
            stop_group(state["worker"])
        stop_group(head)
        shutil.rmtree(base, ignore_errors=True)
