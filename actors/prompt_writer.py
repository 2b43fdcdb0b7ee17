"""`prompts.source: llm`: a language model writes the prompts, from seed topics.

Each row asks the writer for three lines (`WRITER_FORMAT`): an image description, the objects it puts in the
image, a question about it. The Objects line is what keeps `gt_objects` (and with it the hallucination reward)
exact: its names are canonicalised with the object vocabulary, and a row naming an object the vocabulary does not
know is dropped rather than guessed. The text of a row is a function of the config and the row (greedy, or
sampling seeded by the row), so a rewrite gives the same prompts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from actors.common.chat import chat_completion, endpoint
from actors.common.errors import Problem
from actors.common.seeds import stable_seed

WRITER_FORMAT = (
    "Write a prompt for a text-to-image model and a question about the image it makes.\n"
    "Topic: {topic}\n"
    "Answer in exactly three lines:\n"
    "Description: <one sentence describing the image>\n"
    "Objects: <the objects in the image, comma separated>\n"
    "Question: <one question about the image>\n"
)
FIELDS = ("description", "objects", "question")


@dataclass
class WriterConfig:
    """The language model that writes `source: llm` prompts (its schedule: pools.prompts)."""
    backend: str = "transformers"     # transformers (a local or cached causal LM) | openai (any compatible endpoint)
    model: str | None = None          # a model folder / hub id (transformers) or the endpoint's model name (openai)
    api_base: str | None = None       # openai: the server, e.g. http://localhost:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # openai: the environment variable holding the key (unset: no key sent)
    topics_file: str | None = None    # .txt, one topic a line; default: COCO classes x scenes drawn by prompts.seed
    max_new_tokens: int = 96          # tokens the writer may write per prompt
    temperature: float = 0.0          # 0: greedy; > 0: sampling seeded per prompt (the same text on a rewrite)
    # Near-duplicates over the whole set: a prompt whose description shares this Jaccard share of its word set
    # with a kept one (kept: the lowest prompt_id) is dropped. 1.0 drops exact word-set repeats only.
    dedup_threshold: float = 0.8

    def validate(self) -> list[Problem]:
        errs = []
        if self.backend not in ("transformers", "openai"):
            errs.append(Problem("prompts.writer.backend", "must be 'transformers' or 'openai'"))
        if not self.model:
            errs.append(Problem("prompts.writer.model", "required when prompts.source is 'llm'"))
        if self.backend == "openai" and not self.api_base:
            errs.append(Problem("prompts.writer.api_base", "required with backend 'openai'"))
        if self.max_new_tokens < 1:
            errs.append(Problem("prompts.writer.max_new_tokens", "must be >= 1"))
        if self.temperature < 0:
            errs.append(Problem("prompts.writer.temperature", "must be >= 0"))
        if not 0 < self.dedup_threshold <= 1:
            errs.append(Problem("prompts.writer.dedup_threshold", "must be in (0, 1]"))
        return errs


def parse_written(text: str, vocab) -> tuple[dict | None, str | None]:
    """(fields, None) for a well-formed answer, else (None, reason): missing_<field>, no_objects, unknown_object.
    The first line starting with each label counts; object names become the vocabulary's classes."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(description|objects|question)\s*:\s*(.*)$", line, re.IGNORECASE)
        if m and m.group(1).lower() not in found:
            found[m.group(1).lower()] = m.group(2).strip()
    for name in FIELDS:
        if not found.get(name):
            return None, f"missing_{name}"
    names = [n.strip() for n in re.split(r",|\band\b", found["objects"]) if n.strip()]
    names = [re.sub(r"^(a|an|the|some|one|two|three|four)\s+", "", n.lower()).strip(" .") for n in names]
    classes = [vocab.canonical(n) for n in names if n]
    if not classes:
        return None, "no_objects"
    if any(c is None for c in classes):
        return None, "unknown_object"
    return {"image_prompt": found["description"], "question": found["question"],
            "gt_objects": sorted(set(classes))}, None


def _words(text: str) -> frozenset:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def near_duplicates(rows: list[dict], threshold: float, key: str = "image_prompt") -> set[str]:
    """prompt_ids to drop: a row whose word set has Jaccard >= threshold with an earlier kept row (rows go in
    prompt_id order, so the lowest id of a group is kept). Prefix filtering keeps it near linear: two sets that
    similar share a word among the first |A| - ceil(t|A|) + 1 of each, in one global rarest-first order."""
    import math
    rows = sorted(rows, key=lambda r: r["prompt_id"])
    sets = [_words(r[key]) for r in rows]
    freq: dict[str, int] = {}
    for s in sets:
        for w in s:
            freq[w] = freq.get(w, 0) + 1
    index: dict[str, list[int]] = {}
    dropped = set()
    for i, s in enumerate(sets):
        order = sorted(s, key=lambda w: (freq[w], w))
        prefix = order[:len(order) - math.ceil(threshold * len(order)) + 1] if order else []
        seen = {j for w in prefix for j in index.get(w, ())}
        if any(len(s & sets[j]) >= threshold * len(s | sets[j]) for j in sorted(seen)):
            dropped.add(rows[i]["prompt_id"])
            continue
        for w in prefix:
            index.setdefault(w, []).append(i)
    return dropped


class PromptWriter:
    """Ray Data stage: one writer answer per topic row (`text`); parsing and dedup happen on the driver, which
    sees the whole set."""
    REQUIRES = ("prompt_id", "topic")
    ADDS = ("text",)

    def __init__(self, cfg: WriterConfig, threads: int = 1):
        self.cfg = cfg
        if cfg.backend == "openai":
            import os
            self.url, self.key = endpoint(cfg.api_base), os.environ.get(cfg.api_key_env) or None
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(cfg.model)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model).eval()

    def write(self, prompt_id: str, topic: str) -> str:
        text = WRITER_FORMAT.format(topic=topic)
        seed = stable_seed(0, prompt_id, 0) % (2 ** 31)
        if self.cfg.backend == "openai":
            body = {"model": self.cfg.model, "messages": [{"role": "user", "content": text}],
                    "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_new_tokens, "seed": seed}
            return chat_completion(self.url, body, self.key, who="prompt writer", field="prompts.writer")
        tok = self.tok
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        # The template already holds any BOS token; adding special tokens again would double it.
        inp = tok(text, return_tensors="pt", add_special_tokens=not tok.chat_template)
        sample = self.cfg.temperature > 0
        kwargs = {"do_sample": sample, **({"temperature": self.cfg.temperature} if sample else {})}
        self.torch.manual_seed(seed)   # per row: the text does not depend on the batch it came in
        with self.torch.inference_mode():
            out = self.model.generate(**inp, max_new_tokens=self.cfg.max_new_tokens,
                                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                      else tok.eos_token_id, **kwargs)
        return tok.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, batch):
        import pyarrow as pa
        texts = [self.write(p, t) for p, t in zip(batch.column("prompt_id").to_pylist(),
                                                  batch.column("topic").to_pylist())]
        return batch.append_column("text", pa.array(texts, pa.string()))
