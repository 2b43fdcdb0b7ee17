"""`synthalign`: one entry point, each subcommand thin over a library function."""
from __future__ import annotations

import argparse
import json
import sys

from actors.common.errors import ContractError, InputError
from pipelines.cli.cluster import add_cluster_commands
from pipelines.cli.doctor import add_doctor_command
from pipelines.cli.eval import add_eval_commands
from pipelines.cli.plan import add_plan_command
from pipelines.lock import RunLock
from pipelines.typed import ConfigTypeError

USER_ERRORS = (InputError, ConfigTypeError, ContractError)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set prompts.num_prompts=100 (repeatable)")
    p.add_argument("--address", help="Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--wait-for-lock", action="store_true",
                   help="when another run is using output_dir, wait for it instead of stopping")


# What the stream needs in the driver and `prepare` does not: Ray Data (with pandas, about 1 CPU-s). Imported on a
# thread while ray.init waits for Ray's processes, so it is off the path to the first pair; prepare stays first.
STREAM_MODULES = ("ray.data", "pipelines.generate.sink")


def _import_quietly(modules) -> None:
    import importlib
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # the main thread imports it again and reports any real error there
            pass


def _ray(args, warm: tuple = ()) -> dict:
    """Connect, importing `warm` modules meanwhile; returns the clock `run_generate` reports startup against (the
    command's process start)."""
    import threading
    import time

    import psutil
    import ray  # noqa: F401  before the thread: both need the package, only one should import it

    from cluster.connect import connect
    t, started = time.time(), psutil.Process().create_time()
    importer = threading.Thread(target=_import_quietly, args=(warm,), daemon=True)
    importer.start()
    where = connect(args.address)
    if where.startswith("http"):
        print(f"ray: a local cluster for this run, dashboard {where}", file=sys.stderr)
    importer.join()
    # launch: Python, imports, the config and `prepare` (tiny models, prompts, the run folder) before Ray
    return {"command_start": started, "launch": round(t - started, 2), "ray_start": round(time.time() - t, 2)}


def cmd_make_tiny(args) -> int:
    from pipelines.models import build_recipe
    for name, path in build_recipe(args.recipe or args.world, args.out, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


def _one_round(cfg, command: str):
    """generate and train work on one run folder; an iterative run's rounds depend on each other."""
    if cfg.rounds > 1:
        raise InputError(f"rounds: {cfg.rounds} runs with `synthalign run` (each round samples the policy of the "
                         f"one before); `synthalign {command}` takes one round's folder: --set rounds=1", field="rounds")
    return cfg


def cmd_generate(args) -> int:
    from pipelines.config import load_config
    from pipelines.generate.job import prepare, run_generate
    cfg = _one_round(load_config(args.config, args.overrides), "generate")
    with RunLock(cfg.output_dir, wait=args.wait_for_lock):
        prepared = prepare(cfg, overwrite=args.overwrite)  # bad input fails here, before Ray starts
        clock = _ray(args, warm=STREAM_MODULES)
        manifest = run_generate(cfg, prepared=prepared, clock=clock)
    c = manifest["counts"]
    print(f"pairs: {c['pairs']} of {c['questions']} image-questions ({c['prompts']} prompts, {c['errors']} failed rows, "
          f"{c['answers']} answers, dropped {c['dropped'] or 'none'}) -> {cfg.output_dir}/pairs")
    t = manifest["timings_s"]
    keys = ("launch", "ray_start", "actor_start", "model_load", "actors_ready", "first_pair", "stream", "command")
    print("seconds: " + ", ".join(f"{k} {t[k]:g}" for k in keys if k in t))
    return 0


def cmd_train(args) -> int:
    from pipelines.config import load_config
    from pipelines.folder import RunFolder
    from pipelines.run.job import train_run
    from pipelines.train.data import check_pairs
    from pipelines.train.job import check_recipe
    cfg = _one_round(load_config(args.config, args.overrides), "train")
    check_recipe(cfg.train)                                               # bad input fails before Ray starts
    with RunLock(cfg.output_dir, wait=args.wait_for_lock):
        folder = RunFolder(cfg)
        check_pairs(args.data or cfg.train.data or str(folder.pairs))   # footers, columns, sampled rows
        folder.prepare(overwrite=args.overwrite, data=False, train=True)
        _ray(args)
        summary = train_run(cfg, args.data)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_run(args) -> int:
    from pipelines.config import load_config
    from pipelines.run.job import prepare_run, run_all
    cfg = load_config(args.config, args.overrides)
    with RunLock(cfg.output_dir, wait=args.wait_for_lock):
        prepared = prepare_run(cfg, overwrite=args.overwrite)  # bad input fails here, before Ray starts
        run_all(cfg, prepared, clock=_ray(args, warm=STREAM_MODULES))
    return 0


def cmd_report(args) -> int:
    from pipelines.report.report import write_report
    md, html = write_report(args.run)
    print(f"report: {md} and {html}")
    return 0


def cmd_export(args) -> int:
    if args.format == "llava-json":
        from pipelines.report.export import export_llava_json
        print(export_llava_json(args.run, args.out))
        return 0
    from pipelines.report.hf import check_repo, export_hf, push_to_hub
    if args.private and not args.push_to_hub:
        raise InputError("--private goes with --push-to-hub REPO", field="--private")
    if args.push_to_hub:
        check_repo(args.push_to_hub)   # a repo id and a token before anything is written
    out = export_hf(args.run, args.out, test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite,
                    license=args.license)
    print(out)
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthalign", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-tiny", help="build tiny random-weight models: the demo's, twins of the paper's, or "
                                         "the pretrained shapes LLaVA")
    p.add_argument("--out", default=".synthalign/tiny")
    p.add_argument("--recipe", choices=["tiny", "paper", "shapes"],
                   help="tiny: the CPU demo's models; paper: random-weight twins of configs/paper.yaml's models "
                        "(SD3, ImageReward, LLaVA-NeXT, ArmoRM-style reward, LLaVA-1.5); shapes: a small LLaVA "
                        "pretrained on the shapes world (a few minutes on CPU)")
    p.add_argument("--world", choices=["tiny", "shapes"], default="tiny", help="older spelling of --recipe")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_tiny)

    for name, fn, help_ in (("generate", cmd_generate, "make preference pairs"),
                            ("run", cmd_run, "generate, train, then write the report")):
        p = sub.add_parser(name, help=help_)
        _config_args(p)
        p.add_argument("--overwrite", action="store_true",
                       help="replace what a run of another config left here (only the parts it changes)")
        p.set_defaults(fn=fn)

    p = sub.add_parser("train", help="DPO post-training on Ray Train")
    _config_args(p)
    p.add_argument("--data", help="pairs folder (default: train.data or OUTPUT_DIR/pairs)")
    p.add_argument("--overwrite", action="store_true", help="replace a training run of another recipe")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("report", help="write report.md and report.html with plots for a run")
    p.add_argument("run", help="run folder (output_dir)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("export", help="write a run's pairs in another format")
    p.add_argument("run", help="run folder (output_dir) or pairs folder")
    p.add_argument("--format", choices=["llava-json", "hf"], default="llava-json",
                   help="llava-json: the authors' LLaVA JSON; hf: a Hugging Face dataset folder (docs/publishing.md)")
    p.add_argument("--out", help="output folder (default RUN/export/llava or RUN/export/hf)")
    p.add_argument("--test-fraction", type=float, default=0.05, help="hf: share of prompts held out as the test split")
    p.add_argument("--seed", type=int, default=0, help="hf: seed of the train/test split")
    p.add_argument("--license", help="hf: the card's licence id (default: from the models' licences)")
    p.add_argument("--overwrite", action="store_true", help="hf: replace an earlier export in --out")
    p.add_argument("--push-to-hub", metavar="REPO", help="hf: upload to this dataset repo (token: HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="hf: create the repo private")
    p.set_defaults(fn=cmd_export)

    add_eval_commands(sub)
    add_cluster_commands(sub)
    add_plan_command(sub)
    add_doctor_command(sub)
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
        from pipelines.generate.job import JobError
        if args.debug or not isinstance(e, JobError):
            raise
        print(f"synthalign: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("synthalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
