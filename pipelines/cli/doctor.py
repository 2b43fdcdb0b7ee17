"""`synthalign doctor [CONFIG] [--address ADDR] [--smoke]`: one line per node, then one line per problem; with
--smoke, then one line per phase of the paper's stack run on twins (pipelines/smoke.py). Exit 2 on any problem."""
from __future__ import annotations

import sys


def cmd_doctor(args) -> int:
    from cluster.connect import connect
    from pipelines.doctor import describe, diagnose
    cfg = None
    if args.config:
        from pipelines.config import load_config
        cfg = load_config(args.config, args.overrides)
    # The smoke's actors log a lot; a failing phase is its one line, the rest stays in Ray's session logs.
    connect(args.address, dashboard=False, log_to_driver=not args.smoke)
    nodes, problems = diagnose(cfg)
    for line in describe(nodes):
        print(line)
    for p in problems:
        print(f"synthalign: doctor: {p}", file=sys.stderr)
    print(f"doctor: {len(nodes)} node(s), {len(problems) or 'no'} problem(s)", flush=True)
    failed = False
    if args.smoke:
        from pipelines.smoke import run_smoke
        phases = run_smoke(cfg, seed=args.seed, twins_dir=args.twins_dir, log=lambda line: print(line, flush=True))
        failed = not all(p.ok for p in phases)
    return 2 if problems or failed else 0


def add_doctor_command(sub) -> None:
    p = sub.add_parser("doctor", help="check a cluster (and what CONFIG asks of it): versions, GPUs, models, "
                                      "token, output_dir writable from every node")
    p.add_argument("config", nargs="?", help="YAML run config whose models, pools and output_dir to check")
    p.add_argument("--address", help="Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--smoke", action="store_true",
                   help="then run the paper's stack on random-weight twins of its models: a few prompts through "
                        "images, samplers and reward, 5 DPO steps under ZeRO-2 (GPU path when the cluster has GPUs)")
    p.add_argument("--twins-dir", help="node-local folder each node builds the twins in (default: a folder "
                                       "under the system's temp dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the twins' weights (default 0)")
    p.set_defaults(fn=cmd_doctor)
