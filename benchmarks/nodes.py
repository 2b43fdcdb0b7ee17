"""A two-node local Ray cluster for the chaos soak (chaos.py): a head and a worker node started with `ray start
--block` on free ports, with temp dirs of their own, each in a session of its own, so that a node's processes
(raylet, workers, actors) are found and killed by session id and nothing of another Ray on the machine is
touched (never `ray stop`). Both nodes see the machine's folders (private mounts: tests/multinode.py)."""
from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CLEAN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
         "RAY_TMPDIR")
NODE_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # a killed node is declared dead in seconds instead of ~30
            "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3"}


def clean_env(extra: dict | None = None) -> dict:
    """This environment without another Ray's address, token or temp dir; this venv's `ray` first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **(extra or {})}


def free_ports(n: int) -> list[int]:
    """Free ports outside Ray's worker port range (which Ray refuses for its own ports)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if not 10002 <= p <= 19999 and p not in out:
            out.append(p)
    return out


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid`: a `ray start` node and everything it started."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_pids(pids, sig=signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class LocalCluster:
    """A head and one worker node, 1 CPU each, started with `ray start --block` in sessions of their own."""

    def __init__(self, base: Path):
        self.base, self.nodes, self.starts = base, {}, 0
        # token auth, as `ray start --head` asks here; the drivers get the same token (self.env)
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.gcs = None
        # worker port ranges below the ephemeral ports, a new one per node start (a killed node's may linger)
        self.worker_ports = random.Random().sample(range(30000, 32600, 100), 26)

    def _start(self, name: str, args: list[str]) -> None:
        ports = free_ports(5)
        lo = self.worker_ports[self.starts % len(self.worker_ports)]
        tmp = self.base / f"{name}{self.starts}"   # short: Ray's socket paths are limited
        tmp.mkdir()
        log = self.base / f"{name}{self.starts}.log"
        self.starts += 1
        cmd = [str(BIN / "ray"), "start", *args, "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
               "--object-store-memory=200000000", f"--temp-dir={tmp}", f"--min-worker-port={lo}",
               f"--max-worker-port={lo + 99}", f"--dashboard-agent-listen-port={ports[0]}",
               f"--dashboard-agent-grpc-port={ports[1]}", f"--metrics-export-port={ports[2]}",
               f"--runtime-env-agent-port={ports[3]}", f"--node-manager-port={ports[4]}", "--disable-usage-stats"]
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=clean_env({**NODE_ENV, **self.env}), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes[name] = proc
        deadline = time.time() + 300
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def start(self) -> None:
        gcs, client = free_ports(2)
        self.gcs = f"127.0.0.1:{gcs}"
        self._start("head", ["--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                             "--include-dashboard=false"])
        self.start_worker()

    def start_worker(self) -> None:
        self._start("worker", [f"--address={self.gcs}"])

    def pool_actors(self) -> list[int]:
        """Pids of Ray Data's pool actors (process title `ray::MapWorker(...)`) on both nodes."""
        return sorted(p for proc in self.nodes.values() for p in session_pids(proc.pid)
                      if "MapWorker" in _cmdline(p))

    def kill_worker_raylet(self) -> None:
        """kill -9 the worker node's raylet; its workers and `ray start` follow it, stragglers are killed."""
        proc = self.nodes["worker"]
        raylet = [p for p in session_pids(proc.pid) if "/raylet/raylet" in _cmdline(p).split(" ")[0]]
        if not raylet:
            raise RuntimeError("no raylet process in the worker node's session")
        kill_pids(raylet)
        self._stop("worker", grace=10)

    def _stop(self, name: str, grace: float) -> None:
        proc = self.nodes.pop(name)
        deadline = time.time() + grace
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        for _ in range(50):   # the session's stragglers; never `ray stop`, it would end every Ray here
            left = session_pids(proc.pid)
            if not left:
                break
            kill_pids(left)
            time.sleep(0.2)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for name in [n for n in ("worker", "head") if n in self.nodes]:
            kill_pids([self.nodes[name].pid], signal.SIGTERM)
            self._stop(name, grace=20)
