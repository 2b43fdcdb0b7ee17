"""The benchmarks' subprocess protocol: `python -m benchmarks.driver KIND JSON` prints one JSON line last.

A benchmark runs a driver in a subprocess when it needs a process of its own: a fresh peak RSS (scaling) or a
Ray of its own (the cluster simulation). `benchmarks/driver.py` dispatches the kinds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(kind: str, args: dict, env=None) -> dict:
    """Run `python -m benchmarks.driver KIND JSON` and return the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.driver", kind, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench {kind} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1])
