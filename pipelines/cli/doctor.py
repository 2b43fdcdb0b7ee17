"""`synthalign doctor [CONFIG] [--address ADDR]`: one line per node, then one line per problem (exit 2 on any)."""
from __future__ import annotations

import sys


def cmd_doctor(args) -> int:
    from cluster.connect import connect
    from pipelines.doctor import describe, diagnose
    cfg = None
    if args.config:
        from pipelines.config import load_config
        cfg = load_config(args.config, args.overrides)
    connect(args.address, dashboard=False)
    nodes, problems = diagnose(cfg)
    for line in describe(nodes):
        print(line)
    for p in problems:
        print(f"synthalign: doctor: {p}", file=sys.stderr)
    print(f"doctor: {len(nodes)} node(s), {len(problems) or 'no'} problem(s)")
    return 2 if problems else 0


def add_doctor_command(sub) -> None:
    p = sub.add_parser("doctor", help="check a cluster (and what CONFIG asks of it): versions, GPUs, models, "
                                      "token, output_dir writable from every node")
    p.add_argument("config", nargs="?", help="YAML run config whose models, pools and output_dir to check")
    p.add_argument("--address", help="Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.set_defaults(fn=cmd_doctor)
