"""A small LLaVA that can see the shapes world: built from configs, then briefly supervised-fine-tuned on CPU.

`synthalign make-tiny --world shapes` (and a shapes run's `tiny_models` folder) call `make_shapes_base`. The
model is a LLaVA-1.5 in miniature (CLIP vision tower on 64 px images in 8 px patches, a projector, a Llama
decoder; a BPE tokenizer trained on the world's words) trained with a plain torch loop, one thread, seeded,
on freshly drawn shapes images with reference captions and yes/no existence questions.

It stops early on purpose: the point of the shapes world is to measure what DPO does to hallucination, so the
base must answer sensibly yet still hallucinate. Training stops at a fixed step count, chosen so that the
base's yes/no accuracy is well above chance but far from perfect (see `SPEC`); `pretrain.json` records
the validation accuracy at the end so a drifting base is visible. `GUARD` keeps a base from collapsing (the
best checked state comes back when the run ends well below it) and refuses a near-blind one.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

from actors.common import shapes
from actors.common.files import atomic_dir
from actors.common.objects import EXISTENCE_QUESTION, POPE_STRATEGIES

# Everything that determines the base model; its hash names a finished build (the `.complete` marker).
SPEC = {"version": 2, "image": 48, "patch": 16, "vision_hidden": 64, "vision_layers": 2, "hidden": 128,
        "layers": 3, "heads": 4, "vision_steps": 150, "steps": 1200, "min_steps": 200, "check_every": 25,
        "stop_at_yes_no": 0.75, "batch": 32, "lr": 2e-3, "caption_share": 0.3, "shape_negatives": 0.3}
# Not in the build's key: a run that stops at the threshold ends on its best check, so restoring never fires
# and its bytes are what SPEC alone gives; a cached base is re-checked against GUARD instead.
# collapse_margin: 0.1 is ~2 standard errors of the 96-question check near 0.7. min_held_out_yes_no: 0.6 is
# 2 standard errors above chance on the held-out 96. retries: further SFT data streams before refusing.
GUARD = {"collapse_margin": 0.1, "min_held_out_yes_no": 0.6, "retries": 2}


def shapes_corpus() -> list[str]:
    """Text the tokenizer is trained on: prompts, captions, questions and answers of the world."""
    lines = ["USER: ASSISTANT: Yes No", shapes.CAPTION_INSTRUCTION, shapes.POPE_SUFFIX.strip()]
    for i in range(400):
        spec = shapes.make_prompt(0, i, "corpus")
        lines += [spec["image_prompt"], shapes.caption(spec["counts"])]
    lines += [EXISTENCE_QUESTION.format(c) for c in shapes.CLASSES]
    return lines * 2


def build_model(seed: int, spec: dict = SPEC):
    """A randomly initialised LLaVA and its processor (the same layout as a hub LLaVA-1.5)."""
    from pipelines.models.tiny import build_tokenizer, llava_model
    tok = build_tokenizer(vocab_size=512, corpus=shapes_corpus())
    return llava_model(tok, seed, image_size=spec["image"], patch=spec["patch"],
                       vision_hidden=spec["vision_hidden"], vision_layers=spec["vision_layers"],
                       hidden=spec["hidden"], layers=spec["layers"], heads=spec["heads"], max_positions=256)


def sft_example(rng: random.Random, index: int, namespace: str, caption_share: float, shape_negatives: float = 0.0):
    """(image, question, answer): a reference caption, or an existence question (half about absent objects,
    drawn uniformly: no popular or adversarial negatives, as LLaVA's instruction data mostly has none).

    `shape_negatives`: the share of absent objects drawn in a colour the image shows (another shape). With
    uniform negatives alone, answering from colour only is right ~75% of the time, the stop threshold's level:
    measured, some seeds' bases then never look at shape (seed 4: "yes" to every absent object of a present
    colour, "no" to all others), and DPO cannot teach a model to see (POPE -0.3 points)."""
    spec = shapes.make_prompt(0, index, namespace)
    img = shapes.render(spec["image_prompt"], shapes.render_seed(spec["prompt_id"], 0))
    if rng.random() < caption_share:
        return img, shapes.CAPTION_INSTRUCTION, shapes.caption(spec["counts"])
    gt = spec["gt_objects"]
    if rng.random() < 0.5:
        return img, shapes.existence_question(rng.choice(gt)), "Yes"
    if rng.random() < shape_negatives:
        same_colour = shape_negative_pool(gt)
        if same_colour:
            return img, shapes.existence_question(rng.choice(same_colour)), "No"
    return img, shapes.existence_question(shapes.negative(rng, gt, "random")), "No"


def shape_negative_pool(gt: list[str]) -> list[str]:
    """Absent classes in a colour the image shows: only a model that sees shape answers them right."""
    colours = {o.split()[0] for o in gt}
    return [c for c in shapes.CLASSES if c not in gt and c.split()[0] in colours]


def prompt_text(processor, question: str) -> str:
    from actors.sampling import chat_prompt
    return chat_prompt(processor, question)


def collate(processor, examples):
    """Right-padded input ids with labels on the answer tokens only (and the closing </s>)."""
    import torch
    ids, labels, pixels = [], [], []
    for img, q, a in examples:
        prompt = prompt_text(processor, q)
        p = processor(images=[img], text=[prompt], return_tensors="pt")
        ans = processor.tokenizer(" " + a + "</s>", add_special_tokens=False)["input_ids"]
        seq = p["input_ids"][0].tolist() + ans
        ids.append(seq)
        labels.append([-100] * (len(seq) - len(ans)) + ans)
        pixels.append(p["pixel_values"][0])
    width = max(map(len, ids))
    pad = processor.tokenizer.pad_token_id
    mask = [[1] * len(s) + [0] * (width - len(s)) for s in ids]
    return {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids]),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor([s + [-100] * (width - len(s)) for s in labels]),
            "pixel_values": torch.stack(pixels)}


def yes_no_accuracy(model, processor, n: int = 96, seed: int = 0) -> float:
    """Greedy first-token yes/no accuracy on balanced existence questions about unseen images (all three
    negative strategies): a cheap check of how much the base sees."""
    import torch
    rng = random.Random(f"val:{seed}")
    yes = processor.tokenizer(" Yes", add_special_tokens=False)["input_ids"][0]
    no = processor.tokenizer(" No", add_special_tokens=False)["input_ids"][0]
    right = 0
    model.eval()
    for i in range(n):
        spec = shapes.make_prompt(seed, i, "val")
        img = shapes.render(spec["image_prompt"], shapes.render_seed(spec["prompt_id"], 0))
        present = i % 2 == 0
        obj = rng.choice(spec["gt_objects"]) if present else \
            shapes.negative(rng, spec["gt_objects"], POPE_STRATEGIES[i % 3])
        inp = processor(images=[img], text=[prompt_text(processor, shapes.existence_question(obj))],
                        return_tensors="pt")
        with torch.inference_mode():
            logits = model(**inp).logits[0, -1]
        right += (logits[yes] > logits[no]).item() == present
    model.train()
    return right / n


def pretrain_vision(model, processor, seed: int, spec: dict = SPEC, log=print) -> dict:
    """Stage 1, standing in for LLaVA's pretrained CLIP: the vision tower learns what each 3x3 cell of the
    image holds (12 classes or empty) through a linear probe on its patch tokens. Trained jointly from scratch,
    the language model learns the caption grammar long before it learns to look (measured: yes/no stays at
    chance for hundreds of steps), so without this stage a few CPU minutes give a blind model."""
    import torch
    torch.manual_seed(seed)
    rng = random.Random(f"vision:{seed}")
    tower = model.model.vision_tower
    grid = spec["image"] // spec["patch"]
    cell_of = torch.tensor([(r * 3 // grid) * 3 + c * 3 // grid for r in range(grid) for c in range(grid)])
    head = torch.nn.Linear(spec["vision_hidden"], len(shapes.CLASSES) + 1)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=spec["lr"])
    t0, index, acc = time.time(), 0, 0.0
    for step in range(spec["vision_steps"]):
        imgs, labels = [], []
        for _ in range(spec["batch"]):
            p = shapes.make_prompt(0, index, f"vis{seed}-")
            img, layout = shapes.render(p["image_prompt"], rng.getrandbits(32), with_layout=True)
            imgs.append(img)
            labels.append([len(shapes.CLASSES) if c is None else shapes.CLASSES.index(c) for c in layout])
            index += 1
        pixels = processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
        feats = tower(pixel_values=pixels).last_hidden_state[:, 1:]    # patch tokens, as LLaVA reads them
        target = torch.tensor(labels)[:, cell_of]
        logits = head(feats)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        acc = 0.9 * acc + 0.1 * (logits.argmax(-1) == target).float().mean().item()
    log(f"pretrain vision: {spec['vision_steps']} steps, patch accuracy {acc:.3f} ({time.time() - t0:.0f} s)")
    return {"vision_steps": spec["vision_steps"], "vision_patch_accuracy": round(acc, 3),
            "vision_seconds": round(time.time() - t0, 1)}


def example_loss(model, batch):
    """Mean over examples of each example's mean token loss: a one-word "Yes" weighs as much as a caption
    (a token mean would give captions ~80% of the gradient and yes/no would barely be learned)."""
    import torch
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1]
    target = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = (target != -100).float()
    return ((tok * mask).sum(1) / mask.sum(1)).mean()


def pretrain(model, processor, seed: int, spec: dict = SPEC, log=print, *, guard: dict = GUARD,
             check=yes_no_accuracy, attempt: int = 0) -> dict:
    """Stage 2, LLaVA's instruction tuning: projector and language model on captions and yes/no questions,
    the vision tower frozen (as LLaVA-1.5 keeps CLIP frozen). `attempt` > 0 draws another SFT data stream.

    A run that never reaches the stop threshold ends wherever the constant learning rate leaves it: measured,
    seed 1 climbed to 0.73 at step 1,100 and fell to 0.39 a step later. When the last check is below the best
    by `collapse_margin`, the best checked state is restored."""
    import torch
    torch.manual_seed(seed)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    # Attempt 0 keeps today's stream (and so today's bytes); later attempts get streams of their own.
    rng = random.Random(f"sft:{seed}" if attempt == 0 else f"sft:{seed}:{attempt}")
    namespace = f"sft{seed}-" if attempt == 0 else f"sft{seed}.{attempt}-"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], weight_decay=0.0)
    steps, warm = spec["steps"], 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model.train()
    t0, losses, index, checks, best = time.time(), [], 0, [], None
    for step in range(1, steps + 1):
        batch = []
        for _ in range(spec["batch"]):
            batch.append(sft_example(rng, index, namespace, spec["caption_share"], spec["shape_negatives"]))
            index += 1
        loss = example_loss(model, collate(processor, batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps:
            log(f"pretrain step {step}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"({time.time() - t0:.0f} s)")
        # Stop early on purpose, once the base answers yes/no sensibly: when it starts to look at the image
        # differs by seed (a sudden jump, anywhere from ~300 to ~800 steps), so a fixed count gives blind bases.
        if step >= spec["min_steps"] and step % spec["check_every"] == 0:
            checks.append((step, check(model, processor, seed=seed)))
            if checks[-1][1] >= spec["stop_at_yes_no"]:
                log(f"pretrain: stop at step {step}, yes/no accuracy {checks[-1][1]:.2f} on validation images")
                break
            if best is None or checks[-1][1] > best[1]:   # a copy in memory: the model is a few MB
                best = (step, checks[-1][1], {k: v.detach().clone() for k, v in model.state_dict().items()})
    stats = {"steps": step, "final_loss": sum(losses[-20:]) / len(losses[-20:]), "checks": checks,
             "seconds": round(time.time() - t0, 1), "attempt": attempt}
    if best is not None and checks[-1][1] <= best[1] - guard["collapse_margin"]:
        model.load_state_dict(best[2])
        stats["restored_step"] = best[0]
        log(f"pretrain: checks fell from {best[1]:.2f} (step {best[0]}) to {checks[-1][1]:.2f}: "
            f"restored step {best[0]}")
    return stats


# The shapes world's VLM judge (selection.scorer: judge, rewards.judge_model): the same recipe trained past the
# base's deliberate early stop, so it sees what the policy still hallucinates. Seed-independent: one teacher
# serves every bench seed, its SFT stream apart from theirs.
TEACHER_SPEC = {"steps": 1600, "stop_at_yes_no": 0.95, "check_every": 50}
TEACHER_SEED = 100


def make_shapes_judge(out_dir: str | Path, log=print) -> Path:
    """Build (or reuse) the shapes teacher under out_dir/llava (`make_shapes_base` with `TEACHER_SPEC`)."""
    return make_shapes_base(out_dir, seed=TEACHER_SEED, spec=TEACHER_SPEC, log=log)


def guard_problems(stats: dict, guard: dict = GUARD) -> list[str]:
    """Why a build (its pretrain.json) is not an acceptable base: a collapse left in place, or near chance."""
    problems = []
    checks = stats.get("checks") or []
    if checks and "restored_step" not in stats and \
            checks[-1][1] <= max(c for _, c in checks) - guard["collapse_margin"]:
        problems.append(f"checks fell from {max(c for _, c in checks):.2f} to {checks[-1][1]:.2f} (a collapse)")
    if stats["val_yes_no_accuracy"] < guard["min_held_out_yes_no"]:
        problems.append(f"held-out yes/no accuracy {stats['val_yes_no_accuracy']:.2f} is near chance "
                        f"(< {guard['min_held_out_yes_no']})")
    return problems


def make_shapes_base(out_dir: str | Path, seed: int = 0, spec: dict | None = None, log=print, *,
                     guard: dict | None = None, check=yes_no_accuracy) -> Path:
    """Build (or reuse) the pretrained shapes LLaVA under out_dir/llava; returns that folder.

    A build whose held-out check is near chance is retried on the next SFT data stream (a blind base is one
    stream's bad luck, and the bench needs a base per seed), at most `retries` times; then RuntimeError."""
    import torch
    spec = {**SPEC, **(spec or {})}
    guard = {**GUARD, **(guard or {})}
    out_dir = Path(out_dir)
    folder = out_dir / "llava"
    key = hashlib.sha256(json.dumps([spec, seed], sort_keys=True).encode()).hexdigest()[:16]
    marker = folder / ".complete"
    if marker.exists() and marker.read_text().strip() == key:
        problems = guard_problems(json.loads((folder / "pretrain.json").read_text()), guard)
        if not problems:
            return folder
        log(f"pretrain: cached base {folder} rebuilt: {'; '.join(problems)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one thread: two are erratic on these 2-core machines
    t0 = time.time()
    try:
        for attempt in range(guard["retries"] + 1):
            model, processor = build_model(seed, spec)
            stats = pretrain_vision(model, processor, seed, spec, log)
            stats.update(pretrain(model, processor, seed, spec, log, guard=guard, check=check, attempt=attempt))
            for p in model.parameters():
                p.requires_grad_(True)
            # Validation-namespace images of another seed: neither the stop set nor any evaluation image.
            stats["val_yes_no_accuracy"] = check(model, processor, seed=seed + 1000)
            log(f"pretrain: yes/no accuracy {stats['val_yes_no_accuracy']:.2f} on held-out images")
            problems = guard_problems(stats, guard)
            if not problems:
                break
            log(f"pretrain: attempt {attempt} refused: {'; '.join(problems)}")
        else:
            raise RuntimeError(f"shapes base seed {seed}: refused after {guard['retries'] + 1} SFT data streams: "
                               f"{'; '.join(problems)}")
    finally:
        torch.set_num_threads(threads)
    stats["build_seconds"] = round(time.time() - t0, 1)   # every attempt, model building included
    with atomic_dir(folder) as tmp:   # a folder is either complete or absent
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps({"spec": spec, "seed": seed, **stats}, indent=2))
        (tmp / ".complete").write_text(key)
    return folder
