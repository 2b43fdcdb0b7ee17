"""The Ray connection. Only the CLI calls this: library code runs on whatever Ray it is given."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from urllib.parse import urlparse

from actors.common.errors import InputError


def check_listening(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, with one line, where ray.init would retry for a minute: nothing at host:port."""
    if address in ("auto", "local") or address.startswith("anyscale://"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.hostname is None or parsed.port is None:
        raise InputError(f"cannot read host:port from Ray address {address!r}", field="--address")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            pass
    except OSError as e:
        raise InputError(f"nothing is listening at {parsed.hostname}:{parsed.port} ({e.strerror or e}); "
                         "is the Ray head running?", field="--address") from None


def local_system_config(num_cpus: int | None) -> dict:
    """Ray keeps about num_cpus workers (actors included) and kills other idle ones after 1 s. With actor pools
    holding every CPU of a small machine, each shard write then paid for a fresh worker process (~2.5 CPU-s,
    measured in docs/results.md); a higher soft limit keeps a few idle workers for those light tasks."""
    return {"num_workers_soft_limit": 2 * (num_cpus or os.cpu_count() or 1) + 8}


# Credentials every worker needs and a remote node does not have: gated models (SD3-Medium) load with HF_TOKEN,
# W&B logs with WANDB_API_KEY, s3:// and abfs:// runs with what pyarrow reads. Values only, never paths to files
# (GOOGLE_APPLICATION_CREDENTIALS, ~/.aws/credentials): a remote node does not have the file.
FORWARDED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET")

# Ray hands a submitted job's driver the job's config (runtime_env included) in this variable
# (ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR) and merges it into the driver's ray.init.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env() -> dict:
    """The driver's credentials for the job's runtime_env, so every worker on every node has them. Never
    printed; note that Ray's dashboard shows a job's runtime_env to whoever can open the job."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def in_submitted_job() -> bool:
    return JOB_CONFIG_ENV in os.environ


def redact(text: str) -> str:
    """`text` with each forwarded value (8+ characters: shorter ones would garble the text) shown as <NAME>."""
    for name, value in worker_env().items():
        if len(value) >= 8:
            text = text.replace(value, f"<{name}>")
    return text


def _port_or_free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True,
            log_to_driver: bool = True) -> str:
    """Attach to `address` (or RAY_ADDRESS), else start a local Ray bound to 127.0.0.1. Returns the address, or
    a local Ray's dashboard URL (8265, or a free port when another local run holds it)."""
    import ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_listening(address)  # an explicit address is checked even when Ray is already up
    if ray.is_initialized():
        return "already connected"
    if address:
        # In a submitted job the job's runtime_env already gives every worker the credentials `submit` forwarded;
        # naming one again fails ray.init ("Failed to merge the Job's runtime env"), an error quoting the values.
        env = {} if in_submitted_job() else worker_env()
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env={"env_vars": env} if env else None)
        return address
    # Local starts on one machine take turns from the port check until Ray's dashboard is bound: a run whose
    # dashboard lost the port to another run's would go on without one (Ray only logs "Failed to start").
    with _machine_wide_lock("synthalign-local-ray-start.lock"):
        for attempt in range(DASHBOARD_ATTEMPTS):
            port = _port_or_free(8265) if dashboard else None
            try:
                _start_local(port, num_cpus, log_to_driver)
                return f"http://127.0.0.1:{port}" if dashboard else "local"
            except Exception as e:
                # Something else took the port after our check, and Ray said so: take another.
                if not dashboard or attempt == DASHBOARD_ATTEMPTS - 1 or str(port) not in str(e):
                    raise
                ray.shutdown()
    raise AssertionError("unreachable")


@contextmanager
def _machine_wide_lock(name: str):
    import fcntl
    import tempfile
    with open(os.path.join(tempfile.gettempdir(), name), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)   # released when the file closes, or the process ends
        yield


DASHBOARD_ATTEMPTS = 5


def _start_local(port: int | None, num_cpus: int | None, log_to_driver: bool) -> None:
    import ray
    # Ray Train's placement-group cleaner asks the State API whether our run is alive; left to find a dashboard
    # by itself it can ask another local cluster's, hear "not found" and kill our training workers (seen when a
    # second local Ray ran beside a shapes run). Point it at our own dashboard, or at nothing (then it waits).
    api = f"http://127.0.0.1:{port}" if port else "http://127.0.0.1:9"
    # Through the environment, not a job runtime_env: a local Ray's processes inherit the driver's, and so do its
    # workers (credentials included). With a runtime_env no worker could use the ones Ray prestarts, and each
    # started through setup_worker.py, a second Python start (docs/results.md).
    # Only while Ray's processes start: left in the driver's environment it would become the default head of a
    # later `submit` from the same process (cluster/submit.py reads it).
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = api
    try:
        # address="local": a fresh cluster, never one that happens to run on this machine already.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=port is not None, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=log_to_driver, _system_config=local_system_config(num_cpus))
    finally:
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before
