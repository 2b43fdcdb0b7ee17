"""The tiny prompt writer: a small Llama trained for about a minute on CPU to answer the writer's request
(actors/prompt_writer.WRITER_FORMAT) in its three lines, from text made with the prompt templates.

A random-weight LM never writes that format, so `prompts.source: llm` could not be tested end to end on one;
this one learns the format and the vocabulary's object names, enough for most answers to parse. `steps=0` keeps
the random weights (the writer that writes nothing usable). Cached like the other tiny models: a `.complete`
marker holding the spec hash means the folder is done.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from actors.common.files import atomic_dir

SPEC = {"version": 1, "hidden": 96, "layers": 2, "heads": 4, "vocab": 768, "lr": 3e-3, "batch": 16}
STEPS = 500


def example(rng: random.Random) -> tuple[str, str]:
    """(the writer's request for a topic, the three lines a good writer answers with)."""
    from actors.prompt_writer import WRITER_FORMAT
    from actors.prompts import (
        COLORS,
        NUMBER_WORDS,
        SCENES,
        STYLES,
        TEMPLATES,
        _plural,
        default_classes,
    )
    objects = rng.sample(default_classes(), rng.randint(1, 3))
    scene = rng.choice(SCENES)
    phrases = []
    for obj in objects:
        n = rng.choice([1, 1, 2, 3])
        color = rng.choice(COLORS) + " " if rng.random() < 0.5 else ""
        phrases.append(f"{NUMBER_WORDS[n]} {color}{_plural(obj, n)}")
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    answer = (f"Description: {rng.choice(STYLES)} {body} {scene}\nObjects: {', '.join(objects)}\n"
              f"Question: {rng.choice(TEMPLATES).format(obj=rng.choice(objects))}\n")
    return WRITER_FORMAT.format(topic=f"{', '.join(objects)} {scene}"), answer


def _train(model, tok, seed: int, steps: int, log=print) -> float:
    import torch
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=SPEC["lr"])
    model.train()
    loss = float("nan")
    for step in range(steps):
        ids, labels = [], []
        for _ in range(SPEC["batch"]):
            prompt, answer = example(rng)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)   # learn the answer, not the request
        width = max(map(len, ids))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids])
        y = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        out = model(input_ids=x, attention_mask=(x != tok.pad_token_id).long(), labels=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss = out.loss.item()
        if step % 100 == 0:
            log(f"prompt writer step {step}: loss {loss:.3f}")
    model.eval()
    return loss


def build_writer(out: Path, seed: int, steps: int, log=print) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.models.tiny import build_tokenizer
    rng = random.Random(seed)
    corpus = ["".join(example(rng)) for _ in range(400)]
    tok = build_tokenizer(SPEC["vocab"], corpus)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=SPEC["hidden"], intermediate_size=2 * SPEC["hidden"],
        num_hidden_layers=SPEC["layers"], num_attention_heads=SPEC["heads"], num_key_value_heads=SPEC["heads"],
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id))
    if steps:
        _train(model, tok, seed, steps, log)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def make_prompt_writer(out_dir: str | Path, seed: int = 0, steps: int = STEPS, log=print) -> Path:
    """Build (or reuse) the tiny prompt writer in out_dir/writer (out_dir/writer-random when steps is 0)."""
    folder = Path(out_dir) / ("writer" if steps else "writer-random")
    spec = hashlib.sha256(json.dumps([SPEC, seed, steps]).encode()).hexdigest()[:16]
    marker = folder / ".complete"
    if not (marker.exists() and marker.read_text().strip() == spec):
        with atomic_dir(folder) as tmp:   # a folder is either complete or absent
            build_writer(tmp, seed, steps, log)
            (tmp / ".complete").write_text(spec)
    return folder
