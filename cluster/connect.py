"""The Ray connection. Only the CLI calls this: library code runs on whatever Ray it is given."""
from __future__ import annotations

import os


def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> str:
    """Attach to `address` (or RAY_ADDRESS), else start a local Ray bound to 127.0.0.1."""
    import ray
    if ray.is_initialized():
        return "already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             log_to_driver=True)
    return "local"
