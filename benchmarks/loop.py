"""The baseline a user would write: the generation chain as a plain script, no Ray and none of our stages.

It loads the models with diffusers and transformers directly, then runs stage after stage over all prompts,
B prompts per model call, and writes each stage's output to disk before the next starts (as the paper's own
scripts do): candidate PNGs, the best image per prompt by CLIP score, each sampler's answers, the rewards,
then the pairs. What it computes, with a run config's parameters (configs/tiny.yaml in the benchmark):

  images   K = len(guidance_scales) x per_scale candidates, candidate k seeded `candidate_seed(prompt_id, k)`
           (the pipeline's seeds), B prompts per diffusers call at one guidance scale;
  best     CLIP score (100 x cosine of image and prompt embeddings), highest kept;
  answers  each sampler: n answers per (image, instruction) with HF sampling (temperature, top_p, one
           `torch.manual_seed(seed)` per sampler), the B prompts' questions per `generate` call;
  reward   the weighted sum of the z-normalised terms within a question's answers: text reward model on
           (question, answer), CLIP(image, answer), minus the objects the answer asserts that are not in
           gt_objects (the package's object list); coverage is not computed (tiny.yaml gives it no weight);
  pairs    highest vs lowest reward among distinct non-empty answers, kept at margin >= pairs.min_margin.

    python -m benchmarks.loop configs/tiny.yaml --out /tmp/loop [--batch 4] [--set key=value ...]
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def clip_scores(clip, proc, torch, images, texts) -> list[float]:
    inp = proc(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
    img = clip.get_image_features(pixel_values=inp["pixel_values"])
    txt = clip.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    return (100 * torch.nn.functional.cosine_similarity(img, txt)).tolist()


def render_candidates(sd, torch, rows, im, out: Path, batch: int) -> None:
    """K candidate PNGs per prompt, B prompts per diffusers call at one guidance scale."""
    from actors.prompts import candidate_seed
    for part in chunks(rows, batch):
        for k in range(len(im.guidance_scales) * im.per_scale):
            gens = [torch.Generator().manual_seed(candidate_seed(r["prompt_id"], k, im.seed)) for r in part]
            images = sd(prompt=[r["image_prompt"] for r in part], guidance_scale=im.guidance_scales[k // im.per_scale],
                        num_inference_steps=im.steps, height=im.height, width=im.width, generator=gens).images
            for r, img in zip(part, images):
                img.save(out / "images" / f"{r['prompt_id']}-{k}.png")


def select_best(clip, torch, rows, im, out: Path, batch: int) -> None:
    """best.jsonl: the highest-CLIP-scored candidate of each prompt, the B prompts' candidates per call."""
    from PIL import Image

    from actors.prompts import candidate_seed
    n, best = len(im.guidance_scales) * im.per_scale, []
    for part in chunks(rows, batch):
        files = [out / "images" / f"{r['prompt_id']}-{k}.png" for r in part for k in range(n)]
        scores = clip_scores(*clip, torch, [Image.open(f).convert("RGB") for f in files],
                             [r["image_prompt"] for r in part for _ in range(n)])
        for i, r in enumerate(part):
            s = scores[i * n:(i + 1) * n]
            k = max(range(n), key=s.__getitem__)
            best.append({"prompt_id": r["prompt_id"], "file": f"{r['prompt_id']}-{k}.png", "score": s[k],
                         "seed": candidate_seed(r["prompt_id"], k, im.seed)})
    write_jsonl(out / "best.jsonl", best)


def sample_answers(vlm, torch, questions, best, out: Path) -> None:
    """answers-<sampler>.jsonl: n answers per question with HF sampling, one list of questions per call."""
    from PIL import Image
    s, model, proc = vlm
    torch.manual_seed(s.seed)
    answers = []
    for part in questions:
        images = [Image.open(out / "images" / best[q["prompt_id"]]["file"]).convert("RGB") for q in part]
        texts = [proc.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": q["question"] + s.prompt_suffix}]}],
            add_generation_prompt=True) for q in part]
        inp = proc(images=images, text=texts, return_tensors="pt", padding=True)
        kw = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p) if s.temperature > 0 else {}
        gen = model.generate(**inp, max_new_tokens=s.max_new_tokens, num_return_sequences=s.n, **kw)
        decoded = proc.batch_decode(gen[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)
        answers += [{"pair_key": q["pair_key"], "answers": [a.strip() for a in decoded[i * s.n:(i + 1) * s.n]]}
                    for i, q in enumerate(part)]
    write_jsonl(out / f"answers-{s.label}.jsonl", answers)


def score_answers(rm, clip, vocab, torch, cfg, questions, best, out: Path) -> None:
    """rewards.jsonl: every answer's combined reward (the terms z-normalised within its question, by the
    package's own rule: the comparison is about how the chain runs, not what it computes)."""
    from PIL import Image

    from actors.rewards import combine
    model, tok = rm
    by_model = [(s.label, {a["pair_key"]: a["answers"] for a in read_jsonl(out / f"answers-{s.label}.jsonl")})
                for s in cfg.samplers]
    w, scored = cfg.rewards.weights, []
    for part in questions:
        cands = [[(label, a) for label, ans in by_model for a in ans[q["pair_key"]]] for q in part]
        flat_q = [q["question"] for q, c in zip(part, cands) for _ in c]
        flat_a = [a for c in cands for _, a in c]
        chats = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                         tokenize=False) for q, a in zip(flat_q, flat_a)]
        enc = tok(chats, return_tensors="pt", padding=True, truncation=True, max_length=cfg.rewards.max_length,
                  add_special_tokens=False)
        text = model(**enc).logits[:, 0].tolist()
        imgs = [Image.open(out / "images" / best[q["prompt_id"]]["file"]).convert("RGB")
                for q, c in zip(part, cands) for _ in c]
        clip_r = clip_scores(*clip, torch, imgs, flat_a)
        i = 0
        for q, c in zip(part, cands):
            n, gt = len(c), set(q["gt_objects"])
            hall = [-float(len([o for o in vocab.asserted(q["question"], a) if o not in gt])) for _, a in c]
            reward = combine({"text": text[i:i + n], "clip": clip_r[i:i + n], "hallucination": hall}, w)
            scored.append({**q, "answers": [a for _, a in c], "models": [m for m, _ in c], "reward": reward})
            i += n
    write_jsonl(out / "rewards.jsonl", scored)


def write_pairs(best, min_margin: float, out: Path) -> tuple[int, int]:
    """pairs/pairs.parquet: highest vs lowest reward among the distinct non-empty answers (the package's rule)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.pairs import choose
    pairs, dropped = [], 0
    for q in read_jsonl(out / "rewards.jsonl"):
        hi, lo, reason = choose(q["answers"], q["models"], q["reward"], min_margin)
        if reason:
            dropped += 1
            continue
        b = best[q["prompt_id"]]
        pairs.append({"pair_id": q["pair_key"], "prompt_id": q["prompt_id"], "question": q["question"],
                      "image": (out / "images" / b["file"]).read_bytes(), "seed": b["seed"],
                      "chosen": q["answers"][hi], "rejected": q["answers"][lo], "chosen_model": q["models"][hi],
                      "rejected_model": q["models"][lo], "margin": q["reward"][hi] - q["reward"][lo]})
    (out / "pairs").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(pairs), out / "pairs" / "pairs.parquet")
    return len(pairs), dropped


def run_loop(cfg, rows: list[dict], out: Path, batch: int = 4, threads: int | None = 1) -> dict:
    """Run the chain over `rows` (prompt rows) into `out`, B = `batch` prompts per model call; returns the
    seconds per stage (model loading included) and the counts. `threads`: torch threads (None: torch's
    default, one per core). One is the loop's best on our 2-core machines: two took 1.5-15x the wall time
    for 32 prompts, the more so the busier the machine (docs/results.md)."""
    import torch
    (out / "images").mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _run(cfg, rows, out, batch, torch)
    finally:
        torch.set_num_threads(before)


def _run(cfg, rows, out, batch, torch) -> dict:
    from diffusers import DiffusionPipeline
    from transformers import (
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
        AutoProcessor,
        AutoTokenizer,
        CLIPModel,
    )

    from actors.common.objects import COCO_SYNONYMS, ObjectVocab
    seconds, t = {}, time.time()
    sd = DiffusionPipeline.from_pretrained(cfg.images.model)
    sd.set_progress_bar_config(disable=True)
    clip = (CLIPModel.from_pretrained(cfg.selection.model).eval(), AutoProcessor.from_pretrained(cfg.selection.model))
    vlms = []
    for s in cfg.samplers:
        proc = AutoProcessor.from_pretrained(s.model)
        proc.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        vlms.append((s, AutoModelForImageTextToText.from_pretrained(s.model).eval(), proc))
    rm = (AutoModelForSequenceClassification.from_pretrained(cfg.rewards.text_model).eval(),
          AutoTokenizer.from_pretrained(cfg.rewards.text_model))
    vocab = ObjectVocab.from_file(cfg.rewards.synonyms_file or COCO_SYNONYMS)
    # the B prompts' questions go together through the answer and reward models
    questions = [[{"pair_key": f"{r['prompt_id']}-q{j}", "prompt_id": r["prompt_id"], "question": q,
                   "gt_objects": r["gt_objects"]} for r in part for j, q in enumerate(r["instructions"])]
                 for part in chunks(rows, batch)]

    def lap(name):
        nonlocal t
        seconds[name], t = time.time() - t, time.time()
    lap("load")
    with torch.inference_mode():
        render_candidates(sd, torch, rows, cfg.images, out, batch)
        lap("images")
        select_best(clip, torch, rows, cfg.images, out, batch)
        lap("selection")
        best = {b["prompt_id"]: b for b in read_jsonl(out / "best.jsonl")}
        for vlm in vlms:
            sample_answers(vlm, torch, questions, best, out)
        lap("sampling")
        score_answers(rm, clip, vocab, torch, cfg, questions, best, out)
        lap("rewards")
    n_pairs, n_dropped = write_pairs(best, cfg.pairs.min_margin, out)
    lap("pairs")
    return {"seconds": round(sum(seconds.values()), 2), "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
            "prompts": len(rows), "questions": sum(len(q) for q in questions), "pairs": n_pairs,
            "dropped": n_dropped, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    import argparse

    from actors.common.objects import COCO_SYNONYMS, ObjectVocab
    from actors.prompts import load_prompts
    from pipelines.config import load_config
    p = argparse.ArgumentParser(prog="python -m benchmarks.loop", description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=4, help="prompts per model call")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, one per core)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"output_dir={args.out}"] + args.set)
    if cfg.tiny_models:
        from pipelines.models.tiny import make_tiny
        make_tiny(cfg.tiny_models)
    vocab = ObjectVocab.from_file(cfg.rewards.synonyms_file or COCO_SYNONYMS)
    print(json.dumps(run_loop(cfg, load_prompts(cfg.prompts, mentions=vocab.mentions), Path(args.out), args.batch,
                              args.threads or None)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
