"""`synthalign generate`: prompts -> K images -> best image -> answers -> rewards -> pairs, on Ray Data.

The stream ends in `scored/` (one row per image-question with every candidate and reward term); the
finished views `pairs/` (kept pairs) and `candidates/` (one row per answer) are derived from it, each
written to a temporary folder and renamed into place, so a reader never sees half a dataset.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from actors.contract import PROMPT_COLUMNS, check_chain
from actors.errors import InputError
from actors.guard import FAULTS_ENV
from actors.images import ImageSynthesis
from actors.objects import ObjectVocab
from actors.pairs import PairBuilder
from actors.prompts import QuestionExpander, default_classes, load_prompts
from actors.rewards import RewardScorer
from actors.sampling import AnswerSampler
from actors.select import ImageSelection
from cluster.resources import WRITE_CPUS, map_batches_kwargs, task_kwargs
from pipelines.config import RunConfig
from pipelines.outputs import AtomicParquetSink, clean_partial, done_prompts, finalize



def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~", ".")) or os.path.exists(path)


def check_models(cfg: RunConfig) -> None:
    """A local model folder that does not exist fails here, before any actor starts."""
    models = [("images.model", cfg.images.model), ("selection.model", cfg.selection.model),
              ("rewards.text_model", cfg.rewards.text_model), ("rewards.clip_model", cfg.rewards.clip_model)]
    models += [(f"samplers[{i}].model", s.model) for i, s in enumerate(cfg.samplers)]
    for key, path in models:
        if path and _looks_local(path) and not Path(path).expanduser().exists():
            raise InputError(f"model folder not found: {path}", field=key)


def load_vocab(cfg: RunConfig) -> ObjectVocab:
    if cfg.prompts.source == "shapes":
        from actors.shapes import object_vocab
        return object_vocab()
    if cfg.rewards.synonyms_file:
        return ObjectVocab.from_file(cfg.rewards.synonyms_file)
    return ObjectVocab.from_lines(default_classes())


def prompt_table(rows: list[dict]):
    import pyarrow as pa
    return pa.table({
        "prompt_id": pa.array([r["prompt_id"] for r in rows], pa.string()),
        "image_prompt": pa.array([r["image_prompt"] for r in rows], pa.string()),
        "instructions": pa.array([r["instructions"] for r in rows], pa.list_(pa.string())),
        "gt_objects": pa.array([r["gt_objects"] for r in rows], pa.list_(pa.string())),
    })


def build_pipeline(cfg: RunConfig, prompts, vocab: ObjectVocab, stages: dict | None = None):
    """Chain the stages on a Ray Data dataset of prompt rows; the column contract is checked first.

    `stages` swaps stage classes (keys images, selection, sampling, rewards) for stand-ins with the same
    constructor and columns: the benchmark's simulated GPU cluster runs this exact wiring with them.
    """
    import ray.data
    cls = {"images": ImageSynthesis, "selection": ImageSelection, "sampling": AnswerSampler,
           "rewards": RewardScorer, **(stages or {})}
    check_chain(PROMPT_COLUMNS, [cls["images"], cls["selection"], QuestionExpander]
                + [cls["sampling"]] * len(cfg.samplers) + [cls["rewards"], PairBuilder])
    # Blocks of about one images batch keep every pool fed from the first rows on.
    rows_per_block = max(cfg.pool("images").batch_size, -(-prompts.num_rows // 1000))
    ds = ray.data.from_arrow([prompts.slice(i, rows_per_block)
                              for i in range(0, prompts.num_rows, rows_per_block)])

    def stage(ds, fn, pool, **ctor):
        kwargs = map_batches_kwargs(pool)
        if cfg.faults and cfg.faults.stage:  # test-only fault injection travels as an env var
            kwargs["runtime_env"]["env_vars"][FAULTS_ENV] = json.dumps(
                {**dataclasses.asdict(cfg.faults),
                 "marker_dir": cfg.faults.marker_dir or str(Path(cfg.output_dir, ".faults"))})
        return ds.map_batches(fn, fn_constructor_kwargs={**ctor, "threads": pool.threads},
                              batch_format="pyarrow", **kwargs)

    if cfg.fuse:
        parts = ([(cls["images"], {"cfg": cfg.images}), (cls["selection"], {"cfg": cfg.selection}), _expand_questions]
                 + [(cls["sampling"], {"cfg": s}) for s in cfg.samplers]
                 + [(cls["rewards"], {"cfg": cfg.rewards, "vocab": vocab}),
                    functools.partial(_build_pairs, min_margin=cfg.pairs.min_margin)])
        return stage(ds, WholeChain, cfg.pool("images"), parts=parts)
    ds = stage(ds, cls["images"], cfg.pool("images"), cfg=cfg.images)
    # The cheap row-wise steps ride in the actor before them (see _then).
    ds = stage(ds, _then(cls["selection"], _expand_questions), cfg.pool("selection"), cfg=cfg.selection)
    for sampler in cfg.samplers:
        ds = stage(ds, cls["sampling"], cfg.pool("sampling", sampler), cfg=sampler)
    return stage(ds, _then(cls["rewards"], _build_pairs, min_margin=cfg.pairs.min_margin), cfg.pool("rewards"),
                 cfg=cfg.rewards, vocab=vocab)


class WholeChain:
    """`fuse: true`: every stage in one actor, the pool sized by `pools.images`. On CPU nodes one process per
    core, each running the whole chain, beats a process per stage time-sharing the cores: measured in
    BENCHMARKS.md. `parts` are (stage class, constructor kwargs) or plain row-wise callables."""

    def __init__(self, parts, threads: int = 1):
        self.parts = [p[0](**p[1], threads=threads) if isinstance(p, tuple) else p for p in parts]

    def __call__(self, batch):
        for part in self.parts:
            batch = part(batch)
        return batch


def _then(cls, step, **step_kwargs):
    """`cls` whose calls also run the cheap row-wise `step` on their output, in the same actor: a separate
    task per batch costs a hop through the object store and, on a busy node, often a fresh worker process
    (about 1 s of CPU each); measured in BENCHMARKS.md. Keeps the stage's name for the dashboard."""
    def __call__(self, batch):
        return step(cls.__call__(self, batch), **step_kwargs)
    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": __name__,
                                       "__qualname__": f"_then.{cls.__name__}"})


def _expand_questions(batch):
    return QuestionExpander()(batch)


def _build_pairs(batch, min_margin: float):
    from actors.pairs import PairsConfig
    return PairBuilder(PairsConfig(min_margin=min_margin))(batch)


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("synthalign", "ray", "torch", "transformers", "diffusers", "trl", "peft", "deepspeed",
                 "pyarrow", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


class JobError(Exception):
    """The job ran but its result is not acceptable (e.g. too many bad rows)."""


def check_output_dir(cfg: RunConfig, overwrite: bool) -> Path:
    out = Path(cfg.output_dir)
    manifest = out / "manifest.json"
    if manifest.exists() and not overwrite:
        old = json.loads(manifest.read_text()).get("config_hash")
        if old != cfg.hash():
            raise InputError(f"holds a run of another config (hash {old}, this one {cfg.hash()}); "
                             "use another output_dir or pass --overwrite", file=str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:6]}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output folder is not writable ({e.strerror})", file=str(out)) from None
    return out


def prepare(cfg: RunConfig, overwrite: bool = False):
    """Everything that can fail on bad input, done before Ray starts: models, prompts, output folder."""
    from actors.tiny import make_tiny
    if cfg.tiny_models and cfg.images.backend == "shapes":   # the world's base model, pretrained to see it
        from pipelines.pretrain import make_shapes_base
        make_shapes_base(cfg.tiny_models)
    elif cfg.tiny_models:
        make_tiny(cfg.tiny_models)
    check_models(cfg)
    vocab = load_vocab(cfg)
    rows = load_prompts(cfg.prompts, mentions=vocab.mentions)
    return rows, vocab, check_output_dir(cfg, overwrite)


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / "manifest.json")


def write_scored(ds, folder: Path, rows_per_shard: int) -> None:
    """Stream a pipeline's rows into durable shards (the write is a light task beside the actor pools)."""
    ds.write_datasink(AtomicParquetSink(str(folder), rows_per_shard), ray_remote_args=task_kwargs(WRITE_CPUS))


def run_generate(cfg: RunConfig, overwrite: bool = False, prepared=None) -> dict:
    """Run (or resume) the generation job on the connected Ray cluster; returns the manifest."""
    t0 = time.time()
    rows, vocab, out = prepared or prepare(cfg, overwrite)
    if overwrite:
        for name in ("scored", "pairs", "candidates", "errors", ".faults", "manifest.json"):
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    base = {"config": cfg.to_dict(), "config_hash": cfg.hash(), "versions": package_versions()}
    _write_manifest(out, {**base, "status": "running"})  # claims the folder for this config
    scored = out / "scored"
    clean_partial(scored)
    done = done_prompts(scored, {r["prompt_id"]: len(r["instructions"]) for r in rows})
    todo = [r for r in rows if r["prompt_id"] not in done]
    t_prep = time.time()
    if todo:
        write_scored(build_pipeline(cfg, prompt_table(todo), vocab), scored, cfg.rows_per_shard)
    t_stream = time.time()
    counts = finalize(out, cfg.min_rows_per_file)
    counts["images_rendered"] = len(todo) * cfg.images.num_candidates
    counts["prompts_resumed"] = len(done)
    error_fraction = counts["errors"] / max(1, counts["questions"])
    status = "failed" if error_fraction > cfg.max_error_fraction else "complete"
    manifest = {**base, "status": status, "counts": counts,
                "timings_s": {"prepare": round(t_prep - t0, 2), "stream": round(t_stream - t_prep, 2),
                              "finalize": round(time.time() - t_stream, 2), "total": round(time.time() - t0, 2)}}
    _write_manifest(out, manifest)
    if status == "failed":
        raise JobError(f"{counts['errors']} of {counts['questions']} image-questions failed "
                       f"({error_fraction:.1%} > max_error_fraction {cfg.max_error_fraction:.1%}); "
                       f"see {out / 'errors'}")
    return manifest
