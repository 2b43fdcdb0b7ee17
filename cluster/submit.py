"""Jobs on a remote Ray cluster, over the Ray Jobs SDK (the head's dashboard port, usually 8265).

A job is a shell command (`synthalign generate CONFIG ...`) run on the head with this project folder
uploaded as its working_dir, so the cluster runs the code you have, not what its image was built with.

Token auth (Ray >= 2.52): a head started with `ray start` enforces a token when RAY_AUTH_MODE=token is
set on it, or (Ray 2.60) when a token is simply present on the head, while a client sends one only if
*its* environment says RAY_AUTH_MODE=token. We do not depend on that switch: we read the token from the
same places Ray does, in Ray's order, and send it as `Authorization: Bearer ...` ourselves (the SDK
leaves a caller's Authorization header alone). The token is never printed, logged or put into the
job's runtime_env (which the dashboard shows to anyone who can see the job).

The credentials `submit` forwards (cluster.connect.FORWARDED_ENV) do go into the runtime_env; whatever this
module passes on from the head (logs, status messages, errors) has their values replaced by their names.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from actors.common.errors import InputError
from actors.common.files import read_user_text
from cluster.connect import redact

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Never uploaded: local environments, VCS data, run outputs, built tiny models (the job rebuilds them on
# first use), caches, and data files that belong on shared storage, not in a job package (100 MiB cap).
DEFAULT_EXCLUDES = (".venv", "venv", ".git", "runs", ".synthalign", "__pycache__", "*.pyc", "*.parquet",
                    ".pytest_cache", "*.egg-info", "build")

# Ray's own order (ray-core docs, "Token sources and precedence").
TOKEN_HELP = ("set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in ~/.ray/auth_token "
              "(on the head: `ray get-auth-token`)")
# The job's environment is visible in the dashboard; the driver gets the token from its node instead.
_SECRET_ENV = ("RAY_AUTH_TOKEN",)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def read_token() -> tuple[str | None, str]:
    """(token, where it came from): RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        # Ray treats an unreadable RAY_AUTH_TOKEN_PATH as fatal (its C++ loader aborts); say so plainly.
        token = read_user_text(Path(path).expanduser(), "RAY_AUTH_TOKEN_PATH").strip()
        if not token:
            raise InputError("RAY_AUTH_TOKEN_PATH names an empty file", file=path)
        return token, "RAY_AUTH_TOKEN_PATH"
    path = default_token_path()
    if not path.is_file():
        return None, "none"
    token = read_user_text(path, "the Ray auth token").strip()
    return (token, str(path)) if token else (None, "none")


def normalize_address(address: str | None) -> str:
    """The dashboard URL: `http://HEAD:8265`; a bare `HEAD:8265` gets http:// in front."""
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or "").strip().rstrip("/")
    if not address:
        raise InputError("no Ray head given: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    if address.startswith("ray://") or address == "auto":
        raise InputError(f"{address}: jobs go to the head's dashboard address (http://HEAD:8265), "
                         "not the Ray Client or GCS address")
    if "://" not in address:
        address = "http://" + address
    if urlparse(address).scheme not in ("http", "https") or not urlparse(address).hostname:
        raise InputError(f"{address}: not an http(s)://HOST:PORT address")
    return address


def _auth_error(address: str, message: str, source: str) -> InputError:
    # The SDK formats 401 as "Authentication required: ..." and 403 as "Authentication failed: ...".
    if message.startswith("Authentication failed") or "403" in message[:40]:
        return InputError(f"{address}: the Ray head rejected the auth token from {source}: "
                          f"it is not this cluster's token; {TOKEN_HELP}")
    return InputError(f"{address}: the Ray head requires an auth token: {TOKEN_HELP}")


@contextmanager
def _errors(address: str, source: str, job_id: str | None = None):
    """Turn the SDK's failures into one InputError line (no traceback, no token)."""
    from ray.exceptions import AuthenticationError
    try:
        yield
    except AuthenticationError as e:
        raise _auth_error(address, e.message, source) from None
    except ConnectionError:  # the SDK re-raises requests' ConnectionError as the builtin one
        raise InputError(f"{address}: nothing is listening there (is the Ray head up, and is this "
                         "its dashboard port, usually 8265?)") from None
    except RuntimeError as e:
        text = str(e)
        if job_id and ("404" in text or "does not exist" in text):
            raise InputError(f"{address}: no job {job_id} on this cluster") from None
        if "Version check returned 404" in text:
            raise InputError(f"{address}: answers, but is not a Ray dashboard (no Jobs API)") from None
        if redact(text) != text:  # the head's traceback quoted the runtime_env we sent
            raise RuntimeError(redact(text)) from None
        raise
    except Exception as e:  # requests' own errors (timeouts, bad URLs) are not builtins
        if type(e).__module__.startswith(("requests", "urllib3", "aiohttp")):
            raise InputError(f"{address}: {type(e).__name__}: cannot reach the Jobs API") from None
        raise


def client(address: str | None):
    """A JobSubmissionClient for the head at `address`, sending the auth token when one is configured."""
    from ray.job_submission import JobSubmissionClient
    address = normalize_address(address)
    token, source = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    host = urlparse(address).hostname
    if token and address.startswith("http://") and host not in _LOOPBACK:
        logger.warning("sending the Ray auth token to %s over plain http; prefer an SSH tunnel or "
                       "kubectl port-forward to 127.0.0.1", host)
    with _errors(address, source):
        c = JobSubmissionClient(address, headers=headers)
    c._synthalign_source = source  # where the token came from, for error messages (never the token)
    return c


def _call(c, fn, *args, job_id: str | None = None):
    with _errors(c.get_address(), getattr(c, "_synthalign_source", "none"), job_id):
        return fn(*args)


def entrypoint_for(args: list[str]) -> str:
    """One shell command; each argument quoted, so `--set k=[5, 7]` or odd paths survive the shell."""
    return shlex.join(str(a) for a in args)


def runtime_env(working_dir: str | Path, env_vars: dict | None = None, pip: list[str] | None = None,
                excludes=DEFAULT_EXCLUDES) -> dict:
    env = {"working_dir": str(working_dir), "excludes": list(excludes)}
    if env_vars:
        secret = [k for k in env_vars if k in _SECRET_ENV]
        if secret:
            raise InputError(f"{secret[0]}: not passed to jobs (the dashboard shows a job's environment); "
                             "the job gets the token from its node")
        env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    if pip:
        env["pip"] = list(pip)
    return env


def submit(address: str, entrypoint_args: list[str], *, working_dir: str | Path = PROJECT_ROOT,
           env_vars: dict | None = None, pip: list[str] | None = None, excludes=DEFAULT_EXCLUDES,
           submission_id: str | None = None, metadata: dict | None = None) -> str:
    """Upload `working_dir` and start `entrypoint_args` on the head; returns the job (submission) id."""
    if not Path(working_dir).is_dir():
        raise InputError("working_dir is not a folder", file=str(working_dir))
    env = runtime_env(working_dir, env_vars, pip, excludes)
    c = client(address)
    return _call(c, lambda: c.submit_job(entrypoint=entrypoint_for(entrypoint_args), runtime_env=env,
                                         submission_id=submission_id, metadata=metadata))


def status(address: str, job_id: str) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    c = client(address)
    return str(_call(c, c.get_job_status, job_id, job_id=job_id))


def info(address: str, job_id: str) -> dict:
    """Status, message, entrypoint, times, as a plain dict (runtime_env left out: it can be large)."""
    c = client(address)
    d = _call(c, c.get_job_info, job_id, job_id=job_id)
    return {"job_id": job_id, "status": str(d.status), "message": redact(d.message or ""), "entrypoint": d.entrypoint,
            "start_time": d.start_time, "end_time": d.end_time, "driver_exit_code": d.driver_exit_code}


def logs(address: str, job_id: str) -> str:
    """Everything the job has printed so far."""
    c = client(address)
    return redact(_call(c, c.get_job_logs, job_id, job_id=job_id))


def tail_logs(address: str, job_id: str) -> Iterator[str]:
    """Follow the job's output until it ends: the SDK's async generator, iterated synchronously."""
    c = client(address)
    agen = c.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                chunk = _call(c, loop.run_until_complete, agen.__anext__(), job_id=job_id)
            except StopAsyncIteration:
                return
            yield redact(chunk)
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


def stop(address: str, job_id: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    c = client(address)
    return bool(_call(c, c.stop_job, job_id, job_id=job_id))


def wait(address: str, job_id: str, timeout: float | None = None, poll: float = 1.0) -> str:
    """Block until the job ends; returns its final status (raises TimeoutError after `timeout` s)."""
    from ray.job_submission import JobStatus
    c = client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        s = _call(c, c.get_job_status, job_id, job_id=job_id)
        if JobStatus(s).is_terminal():
            return str(s)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {s} after {timeout} s")
        time.sleep(poll)


def dashboard_url(address: str, job_id: str) -> str:
    return f"{normalize_address(address)}/#/jobs/{job_id}"
