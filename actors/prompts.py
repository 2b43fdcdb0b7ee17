"""Prompt source: a seeded, controllable generator, the user's files, or a language model's writing (`llm`:
actors/prompt_writer.py; the run writes those rows once and reads them as a file).

A row: `prompt_id`, `image_prompt` (text-to-image), `instructions` (questions about the image) and
`gt_objects` (the COCO classes the prompt puts in the image, which the hallucination reward and
controlled POPE rely on). A file is checked on the driver, streamed, where a bad row can be reported with its
file and line before anything runs; the rows themselves are made where they are used, from a cursor
(`iter_prompts`), so that no process holds them all.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from actors.common.errors import InputError, Problem
from actors.common.files import iter_user_lines
from actors.common.objects import EXISTENCE_QUESTION
from actors.common.seeds import stable_seed
from actors.prompt_writer import WriterConfig

COCO_CLASSES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
    "teddy_bear hair_drier toothbrush"
).split()
COLORS = ["red", "green", "blue", "yellow", "white", "black", "brown", "orange", "pink", "purple", "gray"]
SCENES = ["in a park", "on a street", "in a kitchen", "on a beach", "in a living room", "in a field",
          "on a table", "in an office", "at a train station", "in a garden"]
STYLES = ["a realistic photo of", "a high-resolution photograph of", "a detailed photo of",
          "a candid snapshot of", "a wide-angle photo of"]
TEMPLATES = [
    "Describe this image in detail.",
    "What objects can you see in this image?",
    "What is happening in this picture?",
    "Where was this photo taken?",
    EXISTENCE_QUESTION.format("{obj}"),
    "What color is the {obj}?",
    "Where is the {obj} in the image?",
    "List every object in the image.",
]
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
DEFAULT_INSTRUCTION = "Describe this image in detail."


def default_classes() -> list[Problem]:
    return [c.replace("_", " ") for c in COCO_CLASSES]


@dataclass
class PromptsConfig:
    # generate | file | shapes (actors/shapes.py: exact gt_objects) | llm (a language model writes them from
    # seed topics: prompts.writer; written once to <output_dir>/prompts/, near-duplicates dropped)
    source: str = "generate"
    num_prompts: int = 16             # prompts to draw (generate, shapes), to read at most (file) or to ask for (llm)
    seed: int = 0                     # the prompt generator's seed
    instructions_per_prompt: int = 1  # questions asked of each image: one pair candidate each
    max_objects: int = 3              # most object classes a generated prompt names
    file: str | None = None            # .txt (one prompt a line) or .jsonl
    instructions_file: str | None = None  # .txt, line i goes with prompt i (paper format)
    # Which round of an iterative run draws these prompts: round r >= 2 draws from a namespace of its own, so its
    # prompt ids differ from every other round's and from the held-out eval set's. Set by the run, not by hand.
    round: int = 1
    writer: WriterConfig = field(default_factory=WriterConfig)  # source llm: the model that writes the prompts

    def validate(self) -> list[Problem]:
        errs = []
        if self.source not in ("generate", "file", "shapes", "llm"):
            errs.append(Problem("prompts.source", "must be 'generate', 'file', 'shapes' or 'llm'"))
        if self.source == "llm":
            errs += self.writer.validate()
        if self.source in ("generate", "shapes", "llm") and self.num_prompts <= 0:
            errs.append(Problem("prompts.num_prompts", "must be > 0"))
        if self.instructions_per_prompt <= 0:
            errs.append(Problem("prompts.instructions_per_prompt", "must be > 0"))
        if self.max_objects <= 0:
            errs.append(Problem("prompts.max_objects", "must be > 0"))
        if self.round < 1:
            errs.append(Problem("prompts.round", "must be >= 1"))
        if self.round > 1 and self.source == "file":
            errs.append(Problem("prompts.source", "rounds >= 2 need fresh prompts: use source 'generate' or 'shapes'"))
        if self.source == "file" and not self.file:
            errs.append(Problem("prompts.file", "required when prompts.source is 'file'"))
        return errs


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    if word == "person":
        return "people"
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    return word + "s"


def round_namespace(round_: int) -> str:
    """'' for round 1 (today's prompts); 'r<k>' for round k, which no other round or the eval set draws from."""
    return "" if round_ == 1 else f"r{round_}"


def generate_prompt(seed: int, index: int, max_objects: int, n_instructions: int,
                    classes: list[str], round_: int = 1) -> dict:
    # One RNG per index: growing num_prompts keeps the first prompts unchanged.
    ns = round_namespace(round_)
    rng = random.Random(f"{seed}:{ns}:{index}" if ns else f"{seed}:{index}")
    objects = rng.sample(classes, rng.randint(1, min(max_objects, len(classes))))
    phrases = []
    for obj in objects:
        n = rng.choice([1, 1, 1, 2, 3])
        color = rng.choice(COLORS) + " " if rng.random() < 0.5 else ""
        phrases.append(f"{NUMBER_WORDS[n]} {color}{_plural(obj, n)}")
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    image_prompt = f"{rng.choice(STYLES)} {body} {rng.choice(SCENES)}"
    picks = rng.sample(TEMPLATES, min(n_instructions, len(TEMPLATES)))
    instructions = [t.format(obj=rng.choice(objects)) for t in picks]
    return {"prompt_id": f"g{seed}{ns}-{index:07d}", "image_prompt": image_prompt,
            "instructions": instructions, "gt_objects": sorted(set(objects))}


def topic_of(seed: int, namespace: str, index: int, max_objects: int, topics: list[str] | None) -> str:
    """Topic `index`: a user topic, or 1..max_objects COCO classes in one of the scenes; one RNG per index."""
    rng = random.Random(f"{seed}:{namespace}:llm:{index}")
    if topics:
        return rng.choice(topics)
    classes = default_classes()
    objects = rng.sample(classes, rng.randint(1, min(max_objects, len(classes))))
    return f"{', '.join(objects)} {rng.choice(SCENES)}"


def _rows_of(path: Path, start: int = 0, first_line: int = 1):
    """A user's file's non-blank lines, stripped: (line number, text, byte offset after the line)."""
    for lineno, line, end in iter_user_lines(path, start=start, first_line=first_line):
        if line.strip():
            yield lineno, line.strip(), end


def _scan(path: Path) -> int:
    """The file's non-blank lines, counted in one streamed pass that refuses a missing or unreadable file."""
    if not path.is_file():
        raise InputError("file not found", file=str(path))
    n = sum(1 for _ in _rows_of(path))
    if not n:
        raise InputError("file is empty", file=str(path))
    return n


def without_image_token(instruction: str) -> str:
    """Instruction files in the LLaVA format start each instruction with `<image>`; the answering stage puts the
    image in through the model's chat template, and a second placeholder would fail every row."""
    return re.sub(r"\s*<image>\s*", " ", instruction).strip()


def _jsonl_row(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg})", file=str(path), row=lineno) from None
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object", file=str(path), row=lineno)
    prompt = obj.get("image_prompt", obj.get("prompt"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("missing or empty", file=str(path), row=lineno, field="image_prompt")
    instr = obj.get("instructions", obj.get("instruction", [DEFAULT_INSTRUCTION]))
    instr = [instr] if isinstance(instr, str) else instr
    if not isinstance(instr, list) or not instr or not all(isinstance(s, str) and s.strip() for s in instr):
        raise InputError("must be a non-empty string or list of strings", file=str(path),
                         row=lineno, field="instructions")
    gt = obj.get("gt_objects")
    if gt is not None and not (isinstance(gt, list) and all(isinstance(s, str) for s in gt)):
        raise InputError("must be a list of strings", file=str(path), row=lineno, field="gt_objects")
    pid = obj.get("prompt_id", f"{path.stem}-{lineno:07d}")
    instr = [without_image_token(s) for s in instr]
    if not all(instr):
        raise InputError("an instruction holds nothing but <image>", file=str(path), row=lineno,
                         field="instructions")
    return {"prompt_id": str(pid), "image_prompt": prompt.strip(), "instructions": instr, "gt_objects": gt}


def _is_jsonl(path: Path) -> bool:
    return path.suffix in (".jsonl", ".json")


def _generated(cfg: PromptsConfig):
    """Row `i` of a generated source: the same row whatever else is generated (one RNG per index)."""
    if cfg.source == "llm":   # its rows exist once the run has written them (pipelines/generate/prompt_writing.py)
        raise InputError("rows are written by the run's prompt writer; read them as a file source",
                         field="prompts.source")
    if cfg.source == "generate":
        classes = default_classes()
        return lambda i: generate_prompt(cfg.seed, i, cfg.max_objects, cfg.instructions_per_prompt, classes,
                                         cfg.round)
    from actors.common.shapes import shapes_prompt_row
    ns = "train" if cfg.round == 1 else f"train-{round_namespace(cfg.round)}-"  # eval draws from "eval"
    return lambda i: shapes_prompt_row(cfg.seed, i, cfg.instructions_per_prompt, cfg.max_objects, ns)


def iter_prompts(cfg: PromptsConfig, mentions=None, start=None):
    """Prompt rows one at a time, each with the cursor after it (a generated row's index + 1; a file's byte offset
    and line number, and the instructions file's): `start`, a cursor, resumes the stream there. A file is read a
    line at a time and only its rows are checked: `check_prompts` checks it whole first. `mentions(text) ->
    classes` fills gt_objects for file prompts that lack them."""
    if cfg.source != "file":
        make = _generated(cfg)
        for i in range(start or 0, cfg.num_prompts):
            yield make(i), i + 1
        return
    path = Path(cfg.file)
    start = tuple(start or (0, 1))
    ipath = Path(cfg.instructions_file) if cfg.instructions_file and not _is_jsonl(path) else None
    instr = _rows_of(ipath, *(start[2:] or (0, 1))) if ipath else None
    for lineno, text, end in _rows_of(path, *start[:2]):
        if _is_jsonl(path):
            row, cursor = _jsonl_row(path, lineno, text), (end, lineno + 1)
        else:
            row = {"prompt_id": f"{path.stem}-{lineno:07d}", "image_prompt": text,
                   "instructions": [DEFAULT_INSTRUCTION], "gt_objects": None}
            cursor = (end, lineno + 1)
            if instr:
                ilineno, itext, iend = next(instr)
                row["instructions"] = [without_image_token(itext)]
                if not row["instructions"][0]:
                    raise InputError("the instruction holds nothing but <image>", file=str(ipath), row=ilineno)
                cursor += (iend, ilineno + 1)
        if row["gt_objects"] is None:
            row["gt_objects"] = sorted(set(mentions(row["image_prompt"]))) if mentions else []
        yield row, cursor


def check_prompts(cfg: PromptsConfig) -> int:
    """The number of prompt rows. A file is checked whole, streamed (only the ids are kept, for the duplicate
    check), so that bad input fails before anything runs; the errors come in the order a whole read gave them."""
    if cfg.source != "file":
        return cfg.num_prompts
    path = Path(cfg.file)
    n = _scan(path)
    if cfg.instructions_file and not _is_jsonl(path):
        ipath = Path(cfg.instructions_file)
        k = _scan(ipath)
        if k != n:
            raise InputError(f"has {k} instructions for {n} prompts in {path}", file=str(ipath))
    seen: dict[str, int] = {}
    duplicate = None
    for row, cursor in iter_prompts(cfg):
        pid, lineno = row["prompt_id"], cursor[1] - 1
        if pid in seen:   # reported after every row's own checks, as when the rows were all read first
            duplicate = duplicate or InputError(f"duplicate prompt_id '{pid}' (first at row {seen[pid]})",
                                                file=str(path), row=lineno, field="prompt_id")
        else:
            seen[pid] = lineno
    if duplicate:
        raise duplicate
    return n


def load_prompts(cfg: PromptsConfig, mentions=None) -> list[dict]:
    """All prompt rows in a list (small sets and tests; a run streams them: pipelines/generate/source.py)."""
    check_prompts(cfg)
    return [row for row, _ in iter_prompts(cfg, mentions)]


def candidate_seed(prompt_id: str, k: int, base_seed: int = 0) -> int:
    """Seed of candidate k of a prompt: a rerun renders the same bytes, whatever the batching."""
    return stable_seed(base_seed, prompt_id, k)


class QuestionExpander:
    """One row per (prompt, instruction): the unit that gets answers, rewards and a pair."""
    REQUIRES = ("prompt_id", "instructions")
    ADDS = ("question", "question_index", "pair_key")
    DROPS = ("instructions",)

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.compute as pc
        instructions = batch.column("instructions")
        parents = pc.list_parent_indices(instructions)
        out = batch.drop_columns(["instructions"]).take(parents)
        index = [j for row in instructions.to_pylist() for j in range(len(row))]
        keys = [f"{pid}-q{j}" for pid, j in zip(out.column("prompt_id").to_pylist(), index)]
        out = out.append_column("question", pc.list_flatten(instructions))
        out = out.append_column("question_index", pa.array(index, pa.int32()))
        return out.append_column("pair_key", pa.array(keys, pa.string()))
