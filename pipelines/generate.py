"""`synthalign generate`: prompts -> K images -> best image -> answers -> rewards -> pairs, on Ray Data.

The stream ends in `scored/` (one row per image-question with every candidate and reward term); the
finished views `pairs/` (kept pairs) and `candidates/` (one row per answer) are derived from it, each
written to a temporary folder and renamed into place, so a reader never sees half a dataset.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from actors.contract import PAIR_COLUMNS, PROMPT_COLUMNS, check_chain
from actors.errors import InputError
from actors.images import ImageSynthesis
from actors.objects import ObjectVocab
from actors.pairs import PairBuilder
from actors.prompts import QuestionExpander, default_classes, load_prompts
from actors.rewards import RewardScorer
from actors.sampling import AnswerSampler
from actors.select import ImageSelection
from cluster.resources import map_batches_kwargs, task_kwargs
from pipelines.config import RunConfig

LINEAGE_COLUMNS = ("question_index", "candidate_scores", "candidate_seeds", "candidate_guidance", "stage_nodes")
CANDIDATE_COLUMNS = ("pair_key", "prompt_id", "question", "answers", "answer_models", "reward_text",
                     "reward_clip", "reward_hallucination", "hallucinated", "reward", "chosen", "rejected")


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


def build_pipeline(cfg: RunConfig, prompts, vocab: ObjectVocab):
    """Chain the stages on a Ray Data dataset of prompt rows; the column contract is checked first."""
    import ray.data
    check_chain(PROMPT_COLUMNS, [ImageSynthesis, ImageSelection, QuestionExpander]
                + [AnswerSampler] * len(cfg.samplers) + [RewardScorer, PairBuilder])
    # Blocks of about one images batch keep every pool fed from the first rows on.
    rows_per_block = max(cfg.pool("images").batch_size, -(-prompts.num_rows // 1000))
    ds = ray.data.from_arrow([prompts.slice(i, rows_per_block)
                              for i in range(0, prompts.num_rows, rows_per_block)])

    def stage(ds, cls, pool, **ctor):
        return ds.map_batches(cls, fn_constructor_kwargs={**ctor, "threads": pool.threads},
                              batch_format="pyarrow", **map_batches_kwargs(pool))

    ds = stage(ds, ImageSynthesis, cfg.pool("images"), cfg=cfg.images)
    ds = stage(ds, ImageSelection, cfg.pool("selection"), cfg=cfg.selection)
    ds = ds.map_batches(_expand_questions, batch_format="pyarrow", **task_kwargs(0.1))
    for sampler in cfg.samplers:
        ds = stage(ds, AnswerSampler, cfg.pool("sampling", sampler), cfg=sampler)
    ds = stage(ds, RewardScorer, cfg.pool("rewards"), cfg=cfg.rewards, vocab=vocab)
    return ds.map_batches(_build_pairs, fn_kwargs={"min_margin": cfg.pairs.min_margin},
                          batch_format="pyarrow", **task_kwargs(0.1))


def _expand_questions(batch):
    return QuestionExpander()(batch)


def _build_pairs(batch, min_margin: float):
    from actors.pairs import PairsConfig
    return PairBuilder(PairsConfig(min_margin=min_margin))(batch)


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _write(ds, out: Path, min_rows: int) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    ds.write_parquet(str(tmp), min_rows_per_file=min_rows)
    if not tmp.exists():  # Ray Data writes nothing for an empty dataset
        tmp.mkdir(parents=True)
    _replace_dir(tmp, out)


def _keep_pairs(batch):
    import pyarrow.compute as pc
    kept = batch.filter(pc.is_null(batch.column("drop_reason")))
    return kept.select([c for c in PAIR_COLUMNS + LINEAGE_COLUMNS])


def _explode_candidates(batch):
    import pyarrow as pa
    rows = batch.select(list(CANDIDATE_COLUMNS)).to_pylist()
    out = []
    for r in rows:
        for j, answer in enumerate(r["answers"]):
            role = "chosen" if answer == r["chosen"] else "rejected" if answer == r["rejected"] else ""
            out.append({"pair_key": r["pair_key"], "prompt_id": r["prompt_id"], "question": r["question"],
                        "candidate_index": j, "model": r["answer_models"][j], "answer": answer,
                        "reward_text": r["reward_text"][j], "reward_clip": r["reward_clip"][j],
                        "reward_hallucination": r["reward_hallucination"][j],
                        "hallucinated": r["hallucinated"][j], "reward": r["reward"][j], "role": role})
    schema = pa.schema([("pair_key", pa.string()), ("prompt_id", pa.string()), ("question", pa.string()),
                        ("candidate_index", pa.int32()), ("model", pa.string()), ("answer", pa.string()),
                        ("reward_text", pa.float64()), ("reward_clip", pa.float64()),
                        ("reward_hallucination", pa.float64()), ("hallucinated", pa.list_(pa.string())),
                        ("reward", pa.float64()), ("role", pa.string())])
    return pa.Table.from_pylist(out, schema=schema)


def count_rows(scored: Path) -> dict:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    t = pads.dataset(str(scored), format="parquet").to_table(
        columns=["prompt_id", "answers", "drop_reason"])
    reasons = t.column("drop_reason").drop_null().to_pylist()
    return {"prompts": len(set(t.column("prompt_id").to_pylist())), "questions": t.num_rows,
            "answers": int(pc.sum(pc.list_value_length(t.column("answers"))).as_py() or 0),
            "pairs": t.num_rows - len(reasons),
            "dropped": {r: reasons.count(r) for r in sorted(set(reasons))}}


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
    if cfg.tiny_models:
        make_tiny(cfg.tiny_models)
    check_models(cfg)
    vocab = load_vocab(cfg)
    rows = load_prompts(cfg.prompts, mentions=vocab.mentions)
    return rows, vocab, check_output_dir(cfg, overwrite)


def run_generate(cfg: RunConfig, overwrite: bool = False, prepared=None) -> dict:
    """Run the generation job on the connected Ray cluster; returns the manifest."""
    t0 = time.time()
    rows, vocab, out = prepared or prepare(cfg, overwrite)
    t_prep = time.time()
    _write(build_pipeline(cfg, prompt_table(rows), vocab), out / "scored", cfg.min_rows_per_file)
    t_stream = time.time()
    import ray.data
    scored = ray.data.read_parquet(str(out / "scored"))
    _write(scored.map_batches(_keep_pairs, batch_format="pyarrow", **task_kwargs(0.5)), out / "pairs",
           cfg.min_rows_per_file)
    cand = ray.data.read_parquet(str(out / "scored"), columns=list(CANDIDATE_COLUMNS))
    _write(cand.map_batches(_explode_candidates, batch_format="pyarrow", **task_kwargs(0.5)),
           out / "candidates", cfg.min_rows_per_file)
    counts = count_rows(out / "scored")
    counts["images_rendered"] = counts["prompts"] * cfg.images.num_candidates
    manifest = {"config": cfg.to_dict(), "config_hash": cfg.hash(), "versions": package_versions(),
                "counts": counts,
                "timings_s": {"prepare": round(t_prep - t0, 2), "stream": round(t_stream - t_prep, 2),
                              "finalize": round(time.time() - t_stream, 2), "total": round(time.time() - t0, 2)}}
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / "manifest.json")
    return manifest
