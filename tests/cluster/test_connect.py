"""cluster.connect on a local Ray: the dashboard address reaches the workers through the environment (no job
runtime_env, so Ray's prestarted workers are usable), and the driver's own environment is left as it was."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_local_ray_workers_see_the_api_address_and_the_driver_env_is_restored():
    script = ("import os, ray\n"
              "from cluster.connect import connect\n"
              "os.environ.pop('RAY_API_SERVER_ADDRESS', None)\n"
              "connect(num_cpus=1, dashboard=False, log_to_driver=False)\n"
              "seen = ray.get(ray.remote(lambda: os.environ.get('RAY_API_SERVER_ADDRESS')).remote())\n"
              "job_env = ray.get_runtime_context().runtime_env\n"
              "print(seen, os.environ.get('RAY_API_SERVER_ADDRESS'), bool(job_env.get('env_vars')))\n"
              "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_TMPDIR"] = tmp = tempfile.mkdtemp(prefix="sa-cn-", dir="/tmp")  # short: socket paths <= 107 bytes
    try:
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "http://127.0.0.1:9 None False"
