"""`synthalign generate`: prompts -> K images -> best image -> answers -> rewards -> pairs, on Ray Data.

The stream ends in `scored/` (one row per image-question with every candidate and reward term); the
finished views `pairs/` (kept pairs) and `candidates/` (one row per answer) are derived from it: a run or
resume folds in only the shards they lack, each new file written under a temporary name and renamed into
place (views.py), so a reader never sees half a file. A write that finds no space ends the run in one line
(`DiskFull`: what is written and where); the finished shards stay whole and the same command resumes.
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from actors.common.errors import InputError, failure_reason
from actors.common.files import looks_local
from actors.rewards import load_vocab
from cluster.doctor import PACKAGES, installed_versions
from cluster.resources import WRITE_CPUS, task_kwargs
from cluster.storage import NO_SPACE, Location, check_everywhere
from pipelines.config import RunConfig
from pipelines.folder import RunFolder
from pipelines.generate.chain import build_pipeline, rows_per_block
from pipelines.generate.outputs import (
    clean_partial,
    finalize,
    question_counts,
    shards,
    written_pairs,
)
from pipelines.generate.source import PromptSource
from pipelines.generate.tracking import report_generate


def package_versions() -> dict:
    found = installed_versions(("synthalign", *PACKAGES))
    return {name: v for name, v in found.items() if v}


class JobError(Exception):
    """The job ran but its result is not acceptable (e.g. too many bad rows)."""


class DiskFull(JobError):
    """A write found no space (a full disk or a quota): what was written stays whole; the same command resumes."""


RESERVE_BYTES = 64 << 10   # several manifests' worth: a run that fills the disk can still record why it ended


def no_space(e: BaseException) -> OSError | None:
    """The out-of-space OSError behind `e`, if any: Ray hands a task's error over as `cause` (inside a
    RayTaskError that is also an OSError, without the file name), Python chains."""
    todo, seen, found = [e], set(), []
    while todo:
        x = todo.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in NO_SPACE:
            found.append(x)
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    own = [x for x in found if not any(c.__name__ == "RayTaskError" for c in type(x).__mro__)]
    return (own or found or [None])[0]


def disk_full_line(folder: RunFolder, err: OSError) -> str:
    """What a run stopped by a full disk says: where the write failed, what is kept, how to go on."""
    what = "disk full" if err.errno == errno.ENOSPC else "disk quota exceeded"
    try:
        n_shards, n_pairs = written_pairs(folder.scored)
        kept = f"{n_shards} shards, {n_pairs} pairs written to {folder.root}"
    except OSError:   # the shards are whole (written beside, renamed); only counting them failed
        kept = f"the shards written so far are kept in {folder.scored}"
    where = str(err.filename or folder.root).splitlines()[0]
    return f"{what} writing {where}: {kept}; free space and run the same command to resume"


def check_models(cfg: RunConfig) -> None:
    """A local model folder that does not exist fails here, before any actor starts."""
    models = [("images.model", cfg.images.model), ("selection.model", cfg.selection.model),
              ("rewards.text_model", cfg.rewards.text_model), ("rewards.clip_model", cfg.rewards.clip_model)]
    models += [(f"samplers[{i}].model", s.model) for i, s in enumerate(cfg.samplers)]
    if cfg.prompts.source == "llm" and cfg.prompts.writer.backend == "transformers":
        models.append(("prompts.writer.model", cfg.prompts.writer.model))
    for key, path in models:
        if path and looks_local(path) and not Path(path).expanduser().exists():
            raise InputError(f"model folder not found: {path}", field=key)


def prepare(cfg: RunConfig, overwrite: bool = False, train: bool = False):
    """Everything that can fail on bad input, done before Ray starts: models, prompts, the run folder
    (`train`: the training recipe too). With overwrite, the folder's stale parts are cleared last. The prompts come
    back checked and counted, not loaded (source.PromptSource)."""
    if cfg.tiny_models:
        from pipelines.models import build_recipe
        build_recipe(cfg.tiny_recipe or ("shapes" if cfg.images.backend == "shapes" else "tiny"), cfg.tiny_models)
    check_models(cfg)
    if train:
        from pipelines.train.job import check_recipe
        check_recipe(cfg.train)
    vocab = load_vocab(cfg.rewards, cfg.prompts.source)
    prompts = PromptSource.checked(cfg.prompts, mentions=vocab.mentions, output_dir=cfg.output_dir)
    return prompts, vocab, RunFolder(cfg).prepare(overwrite, train=train)  # last: only then is anything removed


def write_scored(ds, folder, rows_per_shard: int) -> None:
    """Stream a pipeline's rows into durable shards (the write is a light task beside the actor pools)."""
    from pipelines.generate.sink import AtomicParquetSink
    ds.write_datasink(AtomicParquetSink(str(folder), rows_per_shard), ray_remote_args=task_kwargs(WRITE_CPUS))


def startup_timings(folder, stream_start: float, scored, since: float) -> dict:
    """From the actors' records (chain.record_startup) and the shards: seconds from the stream's start until
    the last actor's constructor began (`actor_start`: scheduling and process start) and until the last was ready
    (`actors_ready`); the slowest actor's own load (`model_load`) and each stage's; the CPU-s all actors used until
    ready (`actors_start_cpu`: process start, imports, model loads); the first shard written,
    counted from `since` (`first_pair`)."""
    import json
    recs = []
    for f in Location(folder).glob("*.json"):
        try:
            recs.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
    out = {}
    if recs:
        out["actor_start"] = round(max(r["init_start"] for r in recs) - stream_start, 2)
        out["actors_ready"] = round(max(r["ready"] for r in recs) - stream_start, 2)
        out["model_load"] = round(max(r["ready"] - r["init_start"] for r in recs), 2)
        by_stage: dict = {}
        for r in recs:
            for name, s in r["loads"].items():
                by_stage[name] = max(by_stage.get(name, 0.0), s)
        out["model_load_by_stage"] = by_stage
        # CPU-s the actors spent before their first batch (process start, imports, model loads), all actors
        cpu = [r.get("cpu_at_ready") for r in recs]
        if all(c is not None for c in cpu):
            out["actors_start_cpu"] = round(sum(cpu), 1)
    written = [p.mtime() for p in shards(scored)]
    new = [t for t in written if t >= stream_start]
    if new:
        out["first_pair"] = round(min(new) - since, 2)
    return out


def run_generate(cfg: RunConfig, overwrite: bool = False, prepared=None, clock: dict | None = None,
                 swap: dict | None = None) -> dict:
    """Run (or resume) the generation job on the connected Ray cluster; returns the manifest. `clock`, from the
    CLI: {"command_start": epoch seconds, "launch": seconds before connecting Ray, "ray_start": seconds connecting};
    figures count from the command's start when given. `swap`: stage stand-ins by pool key (the benchmarks')."""
    t0 = time.time()
    since = (clock or {}).get("command_start", t0)
    prompts, vocab, _ = prepared or prepare(cfg, overwrite)
    folder = RunFolder(cfg)
    check_everywhere(folder.root)   # a local folder on several nodes: every node must see it
    base = {"versions": package_versions()}
    scored, startup = folder.scored, folder.startup
    reserve = None if folder.root.remote else folder.reserve   # object storage does not fill up
    try:
        folder.write_manifest({**base, "status": "running"})  # claims the folder for this config
        if reserve:
            reserve.write_bytes(os.urandom(RESERVE_BYTES))   # random: a compressing file system keeps it too
        clean_partial(scored)
        prompts, writer_counts = prompts.written(cfg, folder, vocab)   # source llm: phase 1, once per folder
        plan = prompts.plan(question_counts(scored), lambda todo: rows_per_block(cfg, todo))
        startup.rmtree()   # this invocation's actors only
        t_prep = time.time()
        if plan.todo:
            write_scored(build_pipeline(cfg, prompts.dataset(plan), vocab, swap=swap, startup_dir=str(startup)),
                         scored, cfg.rows_per_shard)
        t_stream = time.time()
        counts = finalize(folder.root, cfg.min_rows_per_file)
        counts["images_rendered"] = plan.todo * cfg.images.num_candidates
        counts["prompts_resumed"] = plan.done
        if writer_counts:
            counts["prompt_writer"] = writer_counts
        error_fraction = counts["errors"] / max(1, counts["questions"])
        status = "failed" if error_fraction > cfg.max_error_fraction else "complete"
        before = {k: v for k, v in (clock or {}).items() if k in ("launch", "ray_start")}
        timings = {"prepare": round(t_prep - t0, 2), **before, **startup_timings(startup, t_prep, scored, since),
                   "stream": round(t_stream - t_prep, 2), "finalize": round(time.time() - t_stream, 2),
                   "total": round(time.time() - t0, 2)}
        if clock:
            timings["command"] = round(time.time() - since, 2)
        manifest = {**base, "status": status, "counts": counts, "timings_s": timings}
        folder.write_manifest(manifest)
        if reserve:
            reserve.unlink()
    except BaseException as e:   # what was written stays; the manifest says why the run ended
        full = no_space(e)
        reason = disk_full_line(folder, full) if full else failure_reason(e)
        try:
            if reserve:
                reserve.unlink()
            folder.write_manifest({**base, "status": "failed", "reason": reason})  # whole or not at all
        except OSError:   # storage that refuses the manifest too: the first error counts
            reason += "; manifest.json not updated (it keeps its last whole version)"
        if full:
            raise DiskFull(reason) from e
        raise
    report_generate(folder, cfg.train.report_to, manifest)   # best-effort: logs a failure, never raises
    if status == "failed":
        raise JobError(f"{counts['errors']} of {counts['questions']} image-questions failed "
                       f"({error_fraction:.1%} > max_error_fraction {cfg.max_error_fraction:.1%}); "
                       f"see {folder.errors}")
    return manifest
