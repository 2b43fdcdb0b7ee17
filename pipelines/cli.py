"""`synthalign`: one entry point, each subcommand thin over a library function."""
from __future__ import annotations

import argparse
import json
import sys

from actors.contract import ContractError
from actors.errors import InputError
from pipelines.bench_commands import add_bench_command
from pipelines.cluster_commands import add_cluster_commands
from pipelines.evaluate.commands import add_eval_commands
from pipelines.typed import ConfigTypeError

USER_ERRORS = (InputError, ConfigTypeError, ContractError)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set prompts.num_prompts=100 (repeatable)")
    p.add_argument("--address", help="Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")


def _ray(args) -> None:
    from cluster.connect import connect
    connect(args.address)


def cmd_make_tiny(args) -> int:
    if args.world == "shapes":   # a small LLaVA pretrained to see the shapes world (pipelines/pretrain.py)
        from pipelines.pretrain import make_shapes_base
        print(f"llava: {make_shapes_base(args.out, seed=args.seed)}")
        return 0
    from actors.tiny import make_tiny
    for name, path in make_tiny(args.out, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


def cmd_generate(args) -> int:
    from pipelines.config import load_config
    from pipelines.generate import prepare, run_generate
    cfg = load_config(args.config, args.overrides)
    prepared = prepare(cfg, overwrite=args.overwrite)  # bad input fails here, before Ray starts
    _ray(args)
    manifest = run_generate(cfg, prepared=prepared)
    c = manifest["counts"]
    print(f"pairs: {c['pairs']} of {c['questions']} image-questions ({c['prompts']} prompts, {c['errors']} failed rows, "
          f"{c['answers']} answers, dropped {c['dropped'] or 'none'}) -> {cfg.output_dir}/pairs")
    return 0


def cmd_train(args) -> int:
    from pipelines.config import load_config
    from pipelines.train import run_train
    cfg = load_config(args.config, args.overrides)
    _ray(args)
    data = args.data or cfg.train.data or f"{cfg.output_dir}/pairs"
    summary = run_train(cfg.train, data, cfg.output_dir)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_run(args) -> int:
    args.data = None
    cmd_generate(args)
    cmd_train(args)
    from pipelines.config import load_config
    from pipelines.run_report import write_report
    cfg = load_config(args.config, args.overrides)
    if cfg.eval:
        from pipelines.world_eval import run_world_eval
        run_world_eval(cfg)
        print(f"eval: {cfg.output_dir}/eval/summary.json")
    md, html = write_report(cfg.output_dir)
    print(f"report: {md} and {html}")
    return 0


def cmd_report(args) -> int:
    from pipelines.run_report import write_report
    md, html = write_report(args.run)
    print(f"report: {md} and {html}")
    return 0


def cmd_export(args) -> int:
    from pipelines.export import export_llava_json
    print(export_llava_json(args.run, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthalign", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-tiny", help="build the tiny random-weight models (or the pretrained shapes LLaVA)")
    p.add_argument("--out", default=".synthalign/tiny")
    p.add_argument("--world", choices=["coco", "shapes"], default="coco",
                   help="shapes: a small LLaVA briefly pretrained on the shapes world (a few minutes on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_tiny)

    for name, fn, help_ in (("generate", cmd_generate, "make preference pairs"),
                            ("run", cmd_run, "generate, train, then write the report")):
        p = sub.add_parser(name, help=help_)
        _config_args(p)
        p.add_argument("--overwrite", action="store_true", help="replace a run of another config")
        p.set_defaults(fn=fn)

    p = sub.add_parser("train", help="DPO post-training on Ray Train")
    _config_args(p)
    p.add_argument("--data", help="pairs folder (default: train.data or OUTPUT_DIR/pairs)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("report", help="write report.md and report.html with plots for a run")
    p.add_argument("run", help="run folder (output_dir)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("export", help="write a run's pairs in another format")
    p.add_argument("run", help="run folder (output_dir) or pairs folder")
    p.add_argument("--format", choices=["llava-json"], default="llava-json")
    p.add_argument("--out", help="output folder (default RUN/export/llava)")
    p.set_defaults(fn=cmd_export)

    add_eval_commands(sub)
    add_cluster_commands(sub)
    add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"synthalign: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from pipelines.generate import JobError
        if args.debug or not isinstance(e, JobError):
            raise
        print(f"synthalign: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("synthalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
