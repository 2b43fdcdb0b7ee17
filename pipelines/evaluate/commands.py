"""`synthalign eval ...` subcommands, each thin over a function in pipelines/evaluate/."""
from __future__ import annotations

import json


def cmd_eval(args) -> int:
    if args.eval_cmd == "pope-score":
        from pipelines.evaluate.pope import pope_score_cli
        result = pope_score_cli(args.questions, args.answers)
    else:
        from pipelines.evaluate.mmhal import mmhal_score_cli
        result = mmhal_score_cli(args.reviews)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def add_eval_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluation and scoring")
    esub = p.add_subparsers(dest="eval_cmd", required=True)
    e = esub.add_parser("pope-score", help="score POPE answers exactly as the official evaluate.py")
    e.add_argument("--questions", required=True)
    e.add_argument("--answers", required=True)
    e.add_argument("--json", action="store_true")
    e = esub.add_parser("mmhal-score", help="score judged MMHal-Bench reviews")
    e.add_argument("--reviews", required=True)
    e.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_eval)
