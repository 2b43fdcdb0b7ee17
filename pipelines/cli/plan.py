"""`synthalign plan CONFIG --gpus N [--nodes M] [--gpu-memory GIB]`: balanced pool sizes for a GPU cluster whose
shares hold their models (pipelines/plan.py, pipelines/plan_memory.py)."""
from __future__ import annotations

from pathlib import Path


def cmd_plan(args) -> int:
    from pipelines.config import load_config
    from pipelines.plan import (
        items_per_prompt,
        make_plan,
        plan_json,
        read_costs,
        table,
        write_plan,
    )
    cfg = load_config(args.config, args.overrides)
    costs = read_costs(args.costs, items_per_prompt(cfg)) if args.costs else None
    plan = make_plan(cfg, args.gpus, args.nodes, costs, config=str(args.config), gpu_gib=args.gpu_memory)
    out = Path(args.out or Path(args.config).with_name(f"{Path(args.config).stem}-{args.nodes}x{args.gpus}.yaml"))
    written = write_plan(plan, cfg, args.config, out)
    print(plan_json(plan) if args.json else table(plan))
    print(f"-> {written}")
    return 0


def add_plan_command(sub) -> None:
    p = sub.add_parser("plan", help="pool sizes and GPU fractions that balance the stages on N GPUs, the predicted "
                                    "wall time, and a config that uses them")
    p.add_argument("config", help="YAML run config, e.g. configs/paper.yaml")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="memory of each GPU in GiB (default 80: A100/H100 80 GB); no pool gets less than its model "
                        "needs (weights, KV cache, activations)")
    p.add_argument("--costs", help="YAML/JSON of measured GPU-seconds per item by pool (images, selection, "
                                   "sampling or sampling:<name>, rewards); defaults: public A100 figures")
    p.add_argument("--out", help="config to write (default: CONFIG-<nodes>x<gpus>.yaml beside CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key before planning (repeatable)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=cmd_plan)
