"""`synthalign submit` / `synthalign jobs status|logs|stop`: run a job on a remote Ray cluster.

Each subcommand is thin over `cluster/submit.py`. `submit` checks the config locally first (a typo fails
here, not ten minutes into a cluster job), then sends `synthalign <job> CONFIG --set ...` with this project
folder as the job's working_dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from actors.common.errors import InputError
from cluster.connect import worker_env
from cluster.storage import is_uri

JOBS = ("generate", "run", "train")


def _address_arg(p) -> None:
    p.add_argument("--address", default=None,
                   help="the head's dashboard, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS)")


def _parse_env(items: list[str]) -> dict:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def config_in_project(config: str, root: Path) -> str:
    """The config's path inside the uploaded folder; a config outside it would not reach the cluster."""
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        raise InputError("config file not found", file=config)
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise InputError(f"is outside the project folder {root}, which is what the job receives; "
                         "copy it under configs/", file=config) from None


# Local files a run config names. A relative path is read in the job's working_dir (the uploaded copy of
# the project), so one that climbs out of the project folder cannot exist there.
FILE_KEYS = ("rewards.synonyms_file", "prompts.file", "prompts.instructions_file", "train.deepspeed")


def check_for_cluster(cfg, root: Path) -> list[str]:
    """Fail on paths the job cannot see or would lose (a relative output_dir); returns notes (none so far)."""
    for key in FILE_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name, None)
        if not value or "://" in str(value) or Path(value).expanduser().is_absolute():
            continue
        try:
            (root / value).resolve().relative_to(root.resolve())
        except ValueError:
            raise InputError(f"{value} is outside the project folder, so the job will not have it; "
                             f"use an absolute path that exists on the cluster: --set {key}=/path/on/cluster",
                             field=key) from None
    if not is_uri(cfg.output_dir) and not Path(cfg.output_dir).is_absolute():
        raise InputError(f"'{cfg.output_dir}' is relative: the job would write it inside its working_dir copy on the "
                         "head, which Ray deletes; write to object storage (--set output_dir=s3://BUCKET/runs/NAME) "
                         "or to a folder every node mounts", field="output_dir")
    return []


def cmd_submit(args) -> int:
    from cluster import submit as jobs
    from pipelines.config import load_config
    root = Path(args.working_dir or jobs.PROJECT_ROOT)
    rel = config_in_project(args.config, root)
    cfg = load_config(args.config, args.overrides)  # bad keys and values fail here, before any upload
    for note in check_for_cluster(cfg, root):
        print(f"synthalign: note: {note}", file=sys.stderr)
    entry = ["synthalign", args.job, rel]
    for s in args.overrides:
        entry += ["--set", s]
    if args.overwrite:
        entry.append("--overwrite")
    env = _parse_env(args.env)
    forwarded = {k: v for k, v in worker_env().items() if k not in env}
    if forwarded:  # the job's driver runs on the head, which has no copy of the submitter's credentials
        print(f"synthalign: note: passing {', '.join(forwarded)} from this shell to the job (value not shown)",
              file=sys.stderr)
    job_id = jobs.submit(args.address, entry, working_dir=root, env_vars={**env, **forwarded},
                         pip=args.pip or None, submission_id=args.submission_id)
    print(f"submitted {job_id}: {jobs.entrypoint_for(entry)}")
    print(f"dashboard: {jobs.dashboard_url(args.address, job_id)}")
    if not args.wait:
        print(f"follow it: synthalign jobs logs {job_id} --follow --address {jobs.normalize_address(args.address)}")
        return 0
    sys.stdout.flush()
    _quiet_sdk()
    for chunk in jobs.tail_logs(args.address, job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    final = jobs.wait(args.address, job_id)  # the log stream ends just before the status settles
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def _quiet_sdk() -> None:
    # The SDK logs "WebSocket closed for job ..." at INFO when a log stream ends; the CLI prints the outcome.
    import logging
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)


def cmd_status(args) -> int:
    from cluster import submit as jobs
    d = jobs.info(args.address, args.job_id)
    line = f"{d['job_id']}: {d['status']}"
    if d.get("message"):
        line += f" ({d['message']})"
    print(line)
    return 0


def cmd_logs(args) -> int:
    from cluster import submit as jobs
    if args.follow:
        _quiet_sdk()
        for chunk in jobs.tail_logs(args.address, args.job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    else:
        sys.stdout.write(jobs.logs(args.address, args.job_id))
    return 0


def cmd_stop(args) -> int:
    from cluster import submit as jobs
    stopped = jobs.stop(args.address, args.job_id)
    if args.wait:
        print(f"{args.job_id}: {jobs.wait(args.address, args.job_id)}")
    else:
        print(f"{args.job_id}: {'stop requested' if stopped else 'already ended'}")
    return 0


def add_cluster_commands(sub) -> None:
    p = sub.add_parser("submit", help="run a job on a remote Ray cluster (Ray Jobs API)")
    p.add_argument("config", help="YAML run config inside this project, e.g. configs/pairs-2k.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); passed on to the job")
    _address_arg(p)
    p.add_argument("--job", choices=JOBS, default="run", help="what to run (default: run = generate, then train)")
    p.add_argument("--wait", action="store_true", help="stream the job's logs; exit 0 if it succeeded, else 1")
    p.add_argument("--pip", action="append", default=[], metavar="PKG",
                   help="extra pip requirement installed for this job only (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable; never the auth token)")
    p.add_argument("--overwrite", action="store_true", help="passed on to the job")
    p.add_argument("--submission-id", help="job id to use (default: generated)")
    # The project root is what a job needs; another folder is for tests and unusual layouts.
    p.add_argument("--working-dir", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_submit)

    jobs = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    jsub = jobs.add_subparsers(dest="jobs_cmd", required=True)
    for name, fn, help_ in (("status", cmd_status, "the job's status"),
                            ("logs", cmd_logs, "the job's output"),
                            ("stop", cmd_stop, "stop the job")):
        q = jsub.add_parser(name, help=help_)
        q.add_argument("job_id")
        _address_arg(q)
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
        if name == "stop":
            q.add_argument("--wait", action="store_true", help="wait until it has stopped")
        q.set_defaults(fn=fn)
