"""Base vs adapter on held-out images of the run's own world: controlled POPE and CHAIR, objects known.

Two worlds. `shapes` draws images with the shapes generator in its own namespace ("eval"), so neither
pretraining nor the DPO prompts ever drew them. `generated` renders held-out prompts of the run's COCO-style
generator (indices after `prompts.num_prompts`, which the run never used) with the run's own image stage, so
`synthalign run configs/tiny.yaml` compares base and adapter without COCO. For each image, POPE asks "Is there
a {obj} in the image?" with the LLaVA-1.5 suffix about up to `questions_per_image` present objects and as many
absent ones per negative strategy (random, popular, adversarial), answered greedily and scored with the
official rule (`parse_pope_answer`, `pope_metrics`). CHAIR_i / CHAIR_s score greedy captions.

Answers are generated in-process with transformers (the models are small; a Ray actor pool would cost more
to start than the answering takes; `synthalign eval pope` is the Ray Data path for big models).
`eval/summary.json` holds both models' numbers; `eval/answers-*.jsonl` every question and answer (POPE ones with
their label and strategies, captions with the image's objects), enough to recompute them.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from actors.common import shapes
from actors.common.objects import POPE_SUFFIX
from cluster.storage import local_folder
from pipelines.evaluate.chair import chair
from pipelines.evaluate.config import WorldEvalConfig
from pipelines.evaluate.pope import parse_pope_answer, pope_metrics
from pipelines.layout import RunLayout

POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def eval_set(cfg: WorldEvalConfig, seed: int, size: tuple[int, int] = (64, 64)) -> dict:
    """Held-out shapes images with their objects, and POPE rows (image index, question, label) per strategy."""
    images, gts, pope, ids = [], [], {s: [] for s in cfg.strategies}, []
    namespace, tag = ("eval", "") if cfg.split == "test" else ("val", "val:")
    for i in range(cfg.num_images):
        spec = shapes.make_prompt(seed, i, namespace)
        ids.append(spec["prompt_id"])
        images.append(shapes.render(spec["image_prompt"], shapes.render_seed(spec["prompt_id"], 0), *size))
        gt = spec["gt_objects"]
        gts.append(gt)
        rng = random.Random(f"pope:{tag}{seed}:{i}")
        present = rng.sample(gt, min(cfg.questions_per_image, len(gt)))
        for s in cfg.strategies:
            absent = shapes.negatives(rng, gt, s, len(present))
            pope[s] += [(i, shapes.existence_question(o), "yes") for o in present]
            pope[s] += [(i, shapes.existence_question(o), "no") for o in absent]
    return {"images": images, "gt_objects": gts, "pope": pope, "vocab": shapes.object_vocab(), "prompt_ids": ids}


def generated_eval_set(cfg: WorldEvalConfig, run_cfg, seed: int) -> dict:
    """Held-out prompts of the run's generator rendered by the run's image stage (first candidate each)."""
    from actors.images import ImageSynthesis
    from actors.prompts import candidate_seed, default_classes, generate_prompt
    from actors.rewards import load_vocab
    from pipelines.evaluate.pope import controlled_pope_questions
    p, classes = run_cfg.prompts, default_classes()
    first = p.num_prompts + (0 if cfg.split == "test" else 10**7)   # validation: indices the test set never reaches
    rows = [generate_prompt(seed, first + i, p.max_objects, 1, classes) for i in range(cfg.num_images)]
    synth = ImageSynthesis(run_cfg.images, threads=1)
    g = run_cfg.images.guidance_scales[0]
    images = [synth.render(r["image_prompt"], g, candidate_seed(r["prompt_id"], 0, run_cfg.images.seed))
              for r in rows]
    del synth
    vocab = load_vocab(run_cfg.rewards, run_cfg.prompts.source)
    index = {r["prompt_id"]: i for i, r in enumerate(rows)}
    pope = {s: [(index[q["prompt_id"]], q["text"] + POPE_SUFFIX, q["label"])
                for q in controlled_pope_questions(rows, vocab, cfg.questions_per_image, s, seed)]
            for s in cfg.strategies}
    gts = [[vocab.canonical(o) for o in r["gt_objects"]] for r in rows]
    return {"images": images, "gt_objects": gts, "pope": pope, "vocab": vocab,
            "prompt_ids": [r["prompt_id"] for r in rows]}


def load_model(model: str, adapter: str | None = None):
    """The answering stage's transformers backend, greedy (the adapter merged on load), in the model's own dtype."""
    from actors.sampling import SamplerConfig, TransformersBackend
    from pipelines.evaluate.answer import model_dtype
    return TransformersBackend(SamplerConfig(model=model, adapter=adapter, dtype=model_dtype(model)), threads=1)


def answer(backend, images, questions, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding (generate derives positions from the attention mask)."""
    out = []
    for i in range(0, len(questions), batch_size):
        out += [a[0] for a in backend.answer(images[i:i + batch_size], questions[i:i + batch_size],
                                             max_new_tokens=max_new_tokens)]
    return out


def evaluate_model(backend, data: dict, cfg: WorldEvalConfig) -> tuple[dict, list[dict]]:
    """(metrics, answer records) of one model on an eval set."""
    vocab = data["vocab"]
    unique = sorted({(i, q) for rows in data["pope"].values() for i, q, _ in rows})
    texts = answer(backend, [data["images"][i] for i, _ in unique], [q for _, q in unique], 4,
                   cfg.batch_size)
    said = dict(zip(unique, texts))
    by_strategy = {}
    for s, rows in data["pope"].items():
        m = pope_metrics([lab for _, _, lab in rows], [parse_pope_answer(said[(i, q)]) for i, q, _ in rows])
        by_strategy[s] = {k: m[k] for k in ("n",) + POPE_KEYS}
    pope = {k: sum(by_strategy[s][k] for s in by_strategy) / len(by_strategy) for k in POPE_KEYS}
    n = len(data["images"])
    captions = answer(backend, data["images"], [shapes.CAPTION_INSTRUCTION] * n, cfg.caption_tokens,
                      cfg.batch_size)
    ch = chair(captions, data["gt_objects"], vocab)
    # Recall of objects in captions: CHAIR alone rewards saying nothing.
    covered = [len(set(vocab.mentions(c)) & set(g)) / len(g) for c, g in zip(captions, data["gt_objects"])]
    metrics = {"pope": pope, "pope_by_strategy": by_strategy,
               "chair": {"chair_i": ch["chair_i"], "chair_s": ch["chair_s"], "mentioned": ch["mentioned"],
                         "hallucinated": ch["hallucinated"], "coverage": sum(covered) / n}}
    # Each POPE record carries its label and the strategies that ask it (a present object's question is in all
    # three), so the numbers in summary.json can be recomputed from the answer file alone.
    labels, asked_in = {}, {}
    for s, rows in data["pope"].items():
        for i, q, lab in rows:
            labels[(i, q)] = lab
            asked_in.setdefault((i, q), []).append(s)
    records = [{"image": i, "question": q, "answer": said[(i, q)], "label": labels[(i, q)],
                "strategies": asked_in[(i, q)]} for i, q in unique]
    records += [{"image": i, "question": shapes.CAPTION_INSTRUCTION, "answer": c, "gt_objects": g}
                for i, (c, g) in enumerate(zip(captions, data["gt_objects"]))]
    return metrics, records


def run_world_eval(run_cfg, log=print, adapters: list[tuple[str, str]] | None = None) -> dict:
    """Evaluate the base model and the run's adapter; writes <output_dir>/eval/summary.json.

    `adapters` [(name, folder)]: every round's adapter of an iterative run, in order, on the same held-out set;
    summary.json then holds a `rounds` list, and `adapter` is the last round's."""
    import tempfile

    import torch
    cfg: WorldEvalConfig = run_cfg.eval
    folder = RunLayout(run_cfg.output_dir)
    out = folder.eval.mkdir()
    model = cfg.model or run_cfg.train.model
    adapter = cfg.adapter or str(folder.train_paths()["adapter"])
    models = [("base", None)] + (adapters or [("adapter", adapter)])
    scratch = tempfile.TemporaryDirectory(prefix="synthalign-eval-")   # adapters on object storage load from here
    seed = run_cfg.prompts.seed if cfg.seed is None else cfg.seed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one thread: two are erratic on 2-core machines
    try:
        data = eval_set(cfg, seed, (run_cfg.images.width, run_cfg.images.height)) if cfg.world == "shapes" \
            else generated_eval_set(cfg, run_cfg, seed)
        summary = {"world": cfg.world, "split": cfg.split, "images": cfg.num_images, "seed": seed, "model": model,
                   "adapter": models[-1][1]}
        for name, path in models:
            t0 = time.time()
            local = local_folder(path, Path(scratch.name) / name) if path else None
            metrics, records = evaluate_model(load_model(model, local), data, cfg)
            summary[name] = {**metrics, "seconds": round(time.time() - t0, 1)}
            (out / f"answers-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            log(f"eval {name}: POPE accuracy {metrics['pope']['accuracy']:.3f} (yes ratio "
                f"{metrics['pope']['yes_ratio']:.2f}), CHAIR_i {metrics['chair']['chair_i']:.3f}, "
                f"CHAIR_s {metrics['chair']['chair_s']:.3f}")
    finally:
        torch.set_num_threads(threads)
        scratch.cleanup()
    if adapters:
        summary["rounds"] = [{"round": i, "adapter": path, **summary.pop(name)}
                             for i, (name, path) in enumerate(adapters, 1)]
        # `adapter` (as a one-round run has it) is the last round's, with its answers file
        last = summary["rounds"][-1]
        summary["adapter"] = {k: v for k, v in last.items() if k not in ("round", "adapter")}
        summary["adapter_path"], summary["adapter_round"] = last["adapter"], last["round"]
        (out / "answers-adapter.jsonl").write_bytes((out / f"answers-{adapters[-1][0]}.jsonl").read_bytes())
    folder.eval_summary.write_text(json.dumps(summary, indent=2))
    return summary
