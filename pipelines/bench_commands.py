"""`synthalign bench`: the benchmark suite (filled in by the performance work)."""
from __future__ import annotations


def add_bench_command(sub) -> None:
    return None
