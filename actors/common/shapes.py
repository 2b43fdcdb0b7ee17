"""The shapes world: a procedural image backend whose ground truth is known exactly.

Objects are colour+shape classes ("red circle"): 4 colours x 3 shapes = 12 classes. Colour is part of the
object, not an attribute of it, because the errors small VLMs make here are binding errors ("red square" for a
red circle next to a blue square) and CHAIR / POPE only see object classes; with shapes alone there would be
3 classes and nothing to hallucinate about.

Prompts come from a seeded generator with a world prior like COCO's: some classes are more frequent than
others and each class has two "companions" it often appears with. A model that leans on the prior hallucinates
companions, which POPE's popular and adversarial negatives probe. The prompt text follows one fixed grammar
that `parse_prompt` reads back, so the renderer draws exactly what `gt_objects` says:

    a red circle at the top left, two blue squares and a green triangle at the center on a gray background
"""
from __future__ import annotations

import random
import re

from actors.common.objects import (
    EXISTENCE_QUESTION,
    POPE_STRATEGIES,
    POPE_SUFFIX,
    pope_negatives,
)
from actors.common.seeds import stable_seed

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 225), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
# 3x3 grid, reading order; cell i is (row i // 3, column i % 3).
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = {"white": (245, 245, 245), "gray": (190, 190, 190), "striped": (225, 225, 225),
               "noisy": (215, 215, 215)}
COUNTS = {1: "a", 2: "two", 3: "three"}
CAPTION_INSTRUCTION = "Describe this image."

_WORLD = random.Random("shapes-world-prior")  # the prior is part of the world, the same for every seed
POPULARITY = {c: w for c, w in zip(_WORLD.sample(CLASSES, len(CLASSES)),
                                   [1 / (r + 1) ** 0.8 for r in range(len(CLASSES))])}
COMPANIONS = {c: _WORLD.sample([o for o in CLASSES if o != c], 2) for c in CLASSES}

_PHRASE = re.compile(r"(a|two|three) (%s) (%s)s?(?: at the (%s))?" % (
    "|".join(COLOURS), "|".join(SHAPES), "|".join(sorted(POSITIONS, key=len, reverse=True))))
_PROMPT = re.compile(r"(.+) on an? (%s) background" % "|".join(BACKGROUNDS))


def vocab_lines() -> list[str]:
    """Object vocabulary for the hallucination reward and CHAIR: one class per colour+shape."""
    extra = {"circle": ["disc"], "square": ["box"], "triangle": []}
    lines = []
    for c in CLASSES:
        colour, shape = c.split()
        names = [shape] + extra[shape]
        forms = [f"{colour} {n}{s}" for n in names for s in ("", "es" if n.endswith("x") else "s")]
        lines.append(", ".join([c] + forms[1:]))
    return lines


def object_vocab():
    from actors.common.objects import ObjectVocab
    return ObjectVocab.from_lines(vocab_lines())


def plural(shape: str, n: int) -> str:
    return shape + ("s" if n > 1 else "")


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def sample_objects(rng: random.Random, max_objects: int) -> list[str]:
    """Distinct classes: the first by popularity, each next one often a companion of one already there."""
    n = rng.choice([k for k in (1, 2, 2, 3, 3) if k <= max_objects] or [1])
    objs: list[str] = []
    while len(objs) < n:
        pool = [o for prev in objs for o in COMPANIONS[prev] if o not in objs]
        if pool and rng.random() < 0.6:
            objs.append(rng.choice(pool))
        else:
            rest = [c for c in CLASSES if c not in objs]
            objs.append(rng.choices(rest, [POPULARITY[c] for c in rest])[0])
    return objs


def make_prompt(seed: int, index: int, namespace: str = "train", max_objects: int = 3) -> dict:
    """One prompt spec: objects with counts, cells for the single ones, a background; and its text."""
    rng = random.Random(f"shapes:{namespace}:{seed}:{index}")
    objs = sample_objects(rng, max_objects)
    counts = {o: rng.choice([1, 1, 1, 2, 2, 3]) for o in objs}
    cells = rng.sample(range(len(POSITIONS)), len(objs))   # stated positions of single objects
    phrases = []
    for o, cell in zip(objs, cells):
        colour, shape = o.split()
        where = f" at the {POSITIONS[cell]}" if counts[o] == 1 else ""
        phrases.append(f"{COUNTS[counts[o]]} {colour} {plural(shape, counts[o])}{where}")
    bg = rng.choice(list(BACKGROUNDS))
    text = f"{_join(phrases)} on a {bg} background"
    return {"prompt_id": f"shapes-{namespace}{seed}-{index:06d}", "image_prompt": text,
            "gt_objects": sorted(objs), "counts": counts, "rng": rng}


def caption(counts: dict[str, int]) -> str:
    """The reference description: every object with its count, in a fixed class order."""
    parts = []
    for c in CLASSES:
        if c in counts:
            colour, shape = c.split()
            parts.append(f"{COUNTS[counts[c]]} {colour} {plural(shape, counts[c])}")
    verb = "is" if parts[0].startswith("a ") else "are"
    return f"There {verb} {_join(parts)}."


def negatives(rng: random.Random, gt: list[str], strategy: str, k: int = 1) -> list[str]:
    """Up to k objects not in the image, drawn as POPE does, ranked by the world prior's statistics."""
    freq, cooc = world_stats() if strategy != "random" else (None, None)
    return pope_negatives(rng, gt, [c for c in CLASSES if c not in gt], strategy, k, freq, cooc)


def negative(rng: random.Random, gt: list[str], strategy: str) -> str | None:
    found = negatives(rng, gt, strategy, 1)
    return found[0] if found else None


def existence_question(obj: str) -> str:
    return EXISTENCE_QUESTION.format(obj) + POPE_SUFFIX


def shapes_prompt_row(seed: int, index: int, n_instructions: int, max_objects: int = 3,
                      namespace: str = "train") -> dict:
    """A prompts-stage row: a caption instruction, then existence questions, half about absent objects
    (negatives drawn with the three POPE strategies in turn)."""
    spec = make_prompt(seed, index, namespace, max_objects)
    rng, gt = spec["rng"], spec["gt_objects"]
    instructions = [CAPTION_INSTRUCTION]
    for j in range(n_instructions - 1):
        if rng.random() < 0.5:
            obj = rng.choice(gt)
        else:
            obj = negative(rng, gt, POPE_STRATEGIES[(index + j) % 3]) or rng.choice(gt)
        instructions.append(existence_question(obj))
    return {"prompt_id": spec["prompt_id"], "image_prompt": spec["image_prompt"],
            "instructions": instructions, "gt_objects": gt}


_STATS: list = []


def world_stats(n: int = 4000) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Object frequencies and pairwise co-occurrence counts under the world prior (n generated prompts): what
    POPE's popular and adversarial negatives are ranked by."""
    if not _STATS:
        freq, cooc = dict.fromkeys(CLASSES, 0), {}
        for i in range(n):
            gt = make_prompt(0, i, "stats")["gt_objects"]
            for a in gt:
                freq[a] += 1
                for b in gt:
                    if a != b:
                        cooc[(a, b)] = cooc.get((a, b), 0) + 1
        _STATS.extend([freq, cooc])
    return _STATS[0], _STATS[1]


# ---------------------------------------------------------------- rendering

def parse_prompt(text: str) -> tuple[list[tuple[str, int, int | None]], str]:
    """[(class, count, stated cell or None)], background; ValueError if the text is not in the grammar."""
    m = _PROMPT.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a shapes prompt (no 'on a <background> background'): {text!r}")
    parts = re.split(r", | and ", m.group(1))
    objects = []
    for p in parts:
        pm = _PHRASE.fullmatch(p)
        if not pm:
            raise ValueError(f"not a shapes phrase: {p!r} in {text!r}")
        n = {v: k for k, v in COUNTS.items()}[pm.group(1)]
        cell = POSITIONS.index(pm.group(4)) if pm.group(4) else None
        objects.append((f"{pm.group(2)} {pm.group(3)}", n, cell))
    return objects, m.group(2)


def _background(img, kind: str, rng: random.Random) -> None:
    from PIL import ImageDraw
    w, h = img.size
    if kind == "striped":
        draw, step, phase = ImageDraw.Draw(img), rng.choice([6, 8, 10]), rng.randrange(10)
        for x in range(-h + phase, w, step):
            draw.line([(x, 0), (x + h, h)], fill=(200, 200, 200), width=2)
    elif kind == "noisy":
        px = img.load()
        for y in range(h):
            for x in range(w):
                v = 215 + rng.randint(-18, 18)
                px[x, y] = (v, v, v)


def _shape(draw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
    else:
        draw.polygon([(cx, cy - r * 1.1), (cx - r * 1.1, cy + r * 0.9), (cx + r * 1.1, cy + r * 0.9)], fill=fill)


FAILURES = ("drop", "recolour", "stray")


def misdrawn(objects: list[tuple[str, int, int | None]], seed: int, fidelity: float):
    """What a render at `fidelity` draws instead of the prompt's objects, as diffusion models fail: each object
    class fails with probability 1 - fidelity, seeded by the render seed, in one of three ways: left out,
    drawn in another colour (a class the prompt does not name), or drawn with a stray object of a class the
    prompt does not name. Returns (objects to draw, stray classes)."""
    if fidelity >= 1.0:
        return objects, []
    rng = random.Random(f"fidelity:{seed}")   # apart from the drawing rng: fidelity 1.0 draws what it always did
    named = {cls for cls, _, _ in objects}
    drawn, strays = [], []
    for cls, n, cell in objects:
        if rng.random() >= fidelity:
            failure = rng.choice(FAILURES)
            colour, shape = cls.split()
            if failure == "drop":
                continue
            if failure == "recolour":
                others = [c for c in COLOURS if f"{c} {shape}" not in named | {d for d, _, _ in drawn}]
                if others:
                    cls = f"{rng.choice(others)} {shape}"
            else:
                spare = [c for c in CLASSES if c not in named and c not in strays]
                strays.append(rng.choice(spare))
        drawn.append((cls, n, cell))
    return drawn, strays


def render(text: str, seed: int, width: int = 64, height: int = 64, with_layout: bool = False,
           fidelity: float = 1.0):
    """Draw a prompt: stated objects in their cells, the others in free cells; seed moves and resizes each
    shape a little and sets the texture, so candidates of one prompt differ and a rerun is byte-identical.
    fidelity < 1: some objects are drawn wrong (`misdrawn`), so the image no longer shows what the prompt says.
    with_layout: also return the class in each of the 9 cells (None where empty): the truth of what was drawn."""
    from PIL import Image, ImageDraw
    objects, bg = parse_prompt(text)
    objects, strays = misdrawn(objects, seed, fidelity)
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), BACKGROUNDS[bg])
    _background(img, bg, rng)
    stated = {cell for _, _, cell in objects if cell is not None}
    free = [c for c in range(len(POSITIONS)) if c not in stated]
    rng.shuffle(free)
    draw = ImageDraw.Draw(img)
    cw, ch = width / 3, height / 3
    layout: list[str | None] = [None] * len(POSITIONS)
    for cls, n, cell in objects:
        colour, shape = cls.split()
        for cell_i in ([cell] if cell is not None else [free.pop() for _ in range(n)]):
            r = min(cw, ch) * rng.uniform(0.28, 0.34)
            cx = (cell_i % 3 + 0.5) * cw + rng.uniform(-1, 1)
            cy = (cell_i // 3 + 0.5) * ch + rng.uniform(-1, 1)
            _shape(draw, shape, cx, cy, r, COLOURS[colour])
            layout[cell_i] = cls
    for cls in strays[:len(free)]:   # a stray goes where nothing was drawn; none when the grid is full
        colour, shape = cls.split()
        cell_i = free.pop()
        r = min(cw, ch) * rng.uniform(0.28, 0.34)
        _shape(draw, shape, (cell_i % 3 + 0.5) * cw, (cell_i // 3 + 0.5) * ch, r, COLOURS[colour])
        layout[cell_i] = cls
    return (img, layout) if with_layout else img


def drawn_objects(layout: list[str | None]) -> list[str]:
    """The object classes a render really shows (from its layout), sorted like `gt_objects`."""
    return sorted({c for c in layout if c})


def render_seed(prompt_id: str, k: int) -> int:
    return stable_seed("shapes", prompt_id, k)
