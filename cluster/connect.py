"""The Ray connection. Only the CLI calls this: library code runs on whatever Ray it is given."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from actors.errors import InputError


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


def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> str:
    """Attach to `address` (or RAY_ADDRESS), else start a local Ray bound to 127.0.0.1."""
    import ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_listening(address)  # an explicit address is checked even when Ray is already up
    if ray.is_initialized():
        return "already connected"
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    # address="local": a fresh cluster, never one that happens to run on this machine already.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             log_to_driver=True)
    return "local"
