"""Phase 1 of `prompts.source: llm`: the writer pool writes the prompts once, into `<output_dir>/prompts/`.

Two phases rather than a writer stage in the chain: near-duplicates are dropped over the whole set, and a resume
(or a rerun after a failed stream) reads the written prompts instead of asking the model again. The folder holds
`prompts.jsonl`, the `source: file` JSONL format (so the run reads it as a file source, streamed, with the file's
resume cursors, and a user can reuse it as a prompts file), and `written.json` (the counts, by reason dropped). It
is written beside and renamed into place: a folder that exists is whole. The data hash covers prompts.writer, so a
changed writer makes the folder stale like the rest of the data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from actors.common.errors import InputError
from actors.common.files import atomic_dir, looks_local
from actors.prompt_writer import PromptWriter, near_duplicates, parse_written
from actors.prompts import TEMPLATES, PromptsConfig, round_namespace, topic_of
from cluster.resources import map_batches_kwargs, map_on_pool

PROMPTS_FILE, COUNTS_FILE = "prompts.jsonl", "written.json"


def check_writer(cfg: PromptsConfig, output_dir) -> list[str] | None:
    """Bad writer input fails before Ray starts; returns the user's topics (None: the default topics)."""
    from cluster.storage import is_uri
    if is_uri(str(output_dir)):
        raise InputError("prompts.source llm writes its prompts into the run folder: use a local or shared "
                         "output_dir", field="output_dir")
    w = cfg.writer
    if w.backend == "transformers" and looks_local(w.model) and not Path(w.model).expanduser().exists():
        raise InputError(f"model folder not found: {w.model}", field="prompts.writer.model")
    if not w.topics_file:
        return None
    path = Path(w.topics_file)
    if not path.is_file():
        raise InputError("file not found", file=str(path), field="prompts.writer.topics_file")
    topics = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not topics:
        raise InputError("file is empty", file=str(path), field="prompts.writer.topics_file")
    return topics


def file_config(cfg: PromptsConfig, folder) -> PromptsConfig:
    """The written prompts as a `source: file` config."""
    return dataclasses.replace(cfg, source="file", file=str(Path(str(folder.prompts)) / PROMPTS_FILE),
                               instructions_file=None, round=1)


def written(folder) -> dict | None:
    """The counts of the written prompts, None when the folder holds none yet."""
    path = Path(str(folder.prompts)) / COUNTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def topic_rows(cfg: PromptsConfig, topics: list[str] | None) -> list[dict]:
    ns = round_namespace(cfg.round)
    return [{"prompt_id": f"l{cfg.seed}{ns}-{i:07d}",
             "topic": topic_of(cfg.seed, ns, i, cfg.max_objects, topics)} for i in range(cfg.num_prompts)]


def instructions_for(question: str, objects: list[str], cfg: PromptsConfig, prompt_id: str) -> list[str]:
    """The writer's question first; more questions per prompt come from the templates, about its objects."""
    import random
    rng = random.Random(f"{cfg.seed}:{prompt_id}")
    extra = [t.format(obj=rng.choice(objects)) for t in rng.sample(TEMPLATES, len(TEMPLATES))]
    extra = [q for q in dict.fromkeys(extra) if q != question]
    return [question] + extra[:cfg.instructions_per_prompt - 1]


def prompt_rows(texts: list[dict], cfg: PromptsConfig, vocab) -> tuple[list[dict], dict]:
    """The writer's answers parsed, near-duplicates dropped: (rows in prompt_id order, counts by reason)."""
    rows, dropped = [], {}
    for t in sorted(texts, key=lambda t: t["prompt_id"]):
        fields, reason = parse_written(t["text"], vocab)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        rows.append({"prompt_id": t["prompt_id"], "image_prompt": fields["image_prompt"],
                     "instructions": instructions_for(fields["question"], fields["gt_objects"], cfg, t["prompt_id"]),
                     "gt_objects": fields["gt_objects"]})
    dup = near_duplicates(rows, cfg.writer.dedup_threshold)
    if dup:
        dropped["near_duplicate"] = len(dup)
    rows = [r for r in rows if r["prompt_id"] not in dup]
    return rows, {"asked": len(texts), "written": len(rows), "dropped": dropped}


def write_prompts(cfg, folder, vocab, topics: list[str] | None) -> dict:
    """Run the writer pool over the topics and write prompts/ (whole or not at all); returns its counts. No
    usable prompt at all is an InputError naming the writer, and nothing is written."""
    import ray.data
    pcfg = cfg.prompts
    pool = cfg.pool("prompts")
    ds = ray.data.from_items(topic_rows(pcfg, topics))
    ds = map_on_pool(ds, PromptWriter, map_batches_kwargs(pool), batch_format="pyarrow",
                     fn_constructor_kwargs={"cfg": pcfg.writer, "threads": pool.threads})
    texts = [{"prompt_id": r["prompt_id"], "text": r["text"]} for r in ds.take_all()]
    rows, counts = prompt_rows(texts, pcfg, vocab)
    if not rows:
        why = ", ".join(f"{k} {v}" for k, v in sorted(counts["dropped"].items()))
        raise InputError(f"the writer wrote no usable prompt in {counts['asked']} tries ({why}); it must answer in "
                         "the lines 'Description:', 'Objects:' (names the object vocabulary knows), 'Question:'",
                         field="prompts.writer.model")
    counts["writer_hash"] = writer_hash(pcfg)
    with atomic_dir(Path(str(folder.prompts))) as tmp:
        with open(tmp / PROMPTS_FILE, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        (tmp / COUNTS_FILE).write_text(json.dumps(counts, indent=2))
    return counts


def writer_hash(cfg: PromptsConfig) -> str:
    """What decides the written prompts (the folder's data hash covers it too; this guards a hand-copied one)."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def ensure_prompts(cfg, folder, vocab, topics: list[str] | None) -> tuple[PromptsConfig, dict, bool]:
    """The written prompts as a file config, writing them first when the folder has none for this writer:
    (config, counts, whether the writer ran)."""
    counts = written(folder)
    ran = counts is None or counts.get("writer_hash") != writer_hash(cfg.prompts)
    if ran:
        counts = write_prompts(cfg, folder, vocab, topics)
    return file_config(cfg.prompts, folder), counts, ran
