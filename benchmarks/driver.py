"""`python -m benchmarks.driver KIND JSON`: the benchmarks' subprocess drivers (see child.py)."""
from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    kind, arg = sys.argv[1], json.loads(sys.argv[2])
    if kind == "scaling-child":
        from benchmarks.streaming import scaling_child
        result = scaling_child(**arg)
    elif kind == "finalize-child":
        from benchmarks.scale import finalize_child
        result = finalize_child(**arg)
    elif kind == "generation-child":
        from benchmarks.genscale import generation_child
        result = generation_child(**arg)
    elif kind == "train-child":
        from benchmarks.scale import train_child
        result = train_child(**arg)
    else:
        from benchmarks.sim import cluster_child
        result = cluster_child(arg)
    print(json.dumps(result), flush=True)
