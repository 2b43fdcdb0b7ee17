"""`synthalign submit` / `synthalign jobs ...`: cluster subcommands (filled in by the cluster-operations work)."""
from __future__ import annotations


def add_cluster_commands(sub) -> None:
    return None
