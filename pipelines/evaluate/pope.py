"""POPE (Li et al. 2023) scoring, reproducing the official RUCAIBox/POPE `evaluate.py`.

Differences from the official script, all about input handling, none about the numbers:
- answers are paired with questions by `question_id` (the script zips two files by line position, which
  silently mis-scores a reordered or partial answer file); unpaired ids are an error;
- zero denominators give 0.0 instead of ZeroDivisionError;
- labels must be "yes"/"no" (the script treats anything but "no" as yes).

`controlled_pope_questions` builds POPE-style questions for our own generated images, where the prompt says
which objects are in each image (`gt_objects`), so hallucination is measured without human labels.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

from actors.common.errors import InputError
from actors.common.files import read_user_lines
from actors.common.objects import (
    EXISTENCE_QUESTION,
    POPE_STRATEGIES,
    pope_negatives,
    says_no,
)

QUESTION_FIELDS = ("question_id", "image", "text", "label")


def parse_pope_answer(text: str) -> str:
    """Map a free-form answer to "yes"/"no" exactly as the official script does.

    Deliberately literal: only the first sentence counts, tokens are split on single spaces and matched
    case-sensitively, so "NO" is yes and "" is yes. Changing this would make our numbers incomparable.
    """
    return "no" if says_no(text) else "yes"   # the rule lives with the rewards, which must agree with it


def pope_metrics(labels: list[str], preds: list[str]) -> dict:
    """Binary metrics with "yes" as the positive class; zero denominators give 0.0."""
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    for name, seq in (("label", labels), ("prediction", preds)):
        bad = [x for x in seq if x not in ("yes", "no")]
        if bad:
            raise ValueError(f"{name} must be 'yes' or 'no', got {bad[0]!r}")
    pairs = list(zip(labels, preds))
    tp = sum(1 for l, p in pairs if l == "yes" and p == "yes")
    fp = sum(1 for l, p in pairs if l == "no" and p == "yes")
    tn = sum(1 for l, p in pairs if l == "no" and p == "no")
    fn = sum(1 for l, p in pairs if l == "yes" and p == "no")
    n = len(pairs)

    def div(a: float, b: float) -> float:
        return a / b if b else 0.0

    precision, recall = div(tp, tp + fp), div(tp, tp + fn)
    return {"n": n, "accuracy": div(tp + tn, n), "precision": precision, "recall": recall,
            "f1": div(2 * precision * recall, precision + recall), "yes_ratio": div(tp + fp, n)}


def _read_jsonl(path: str | Path, what: str):
    """Yield (row, object) for each non-blank line; rows are 1-based line numbers."""
    for row, line in enumerate(read_user_lines(path, f"{what} file"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON ({e.msg}); expected one JSON object per line",
                             file=str(path), row=row) from None
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object, got {type(obj).__name__}", file=str(path), row=row)
        yield row, obj


def _qid(obj: dict, path, row) -> str:
    # Ids are compared as strings so that 1 and "1" pair (some answer writers stringify ids).
    qid = obj.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise InputError(f"question_id must be an integer or a non-empty string, got {qid!r}",
                         file=str(path), row=row, field="question_id")
    return str(qid)


def load_questions(path: str | Path) -> list[dict]:
    """POPE question file (JSON Lines: question_id, image, text, label), in file order."""
    out, seen = [], {}
    for row, obj in _read_jsonl(path, "POPE questions"):
        for f in QUESTION_FIELDS:
            if f not in obj:
                raise InputError("missing field", file=str(path), row=row, field=f)
        qid = _qid(obj, path, row)
        if qid in seen:
            raise InputError(f"duplicate question_id {obj['question_id']!r} (first on row {seen[qid]})",
                             file=str(path), row=row, field="question_id")
        seen[qid] = row
        if obj["label"] not in ("yes", "no"):
            raise InputError(f"label must be 'yes' or 'no', got {obj['label']!r}",
                             file=str(path), row=row, field="label")
        out.append(obj)
    if not out:
        raise InputError("no questions in file", file=str(path))
    return out


def load_answers(path: str | Path) -> list[dict]:
    """Answer file (JSON Lines): question_id plus `answer`, or `text` as LLaVA's model_vqa_loader writes.

    Returns [{"question_id", "answer", "row"}] in file order (row: 1-based line, for error messages).
    """
    out, seen = [], {}
    for row, obj in _read_jsonl(path, "answers"):
        qid = _qid(obj, path, row)
        field = "answer" if "answer" in obj else "text" if "text" in obj else None
        if field is None:
            raise InputError("missing field (or 'text')", file=str(path), row=row, field="answer")
        if not isinstance(obj[field], str):
            raise InputError(f"must be a string, got {type(obj[field]).__name__}",
                             file=str(path), row=row, field=field)
        if qid in seen:
            raise InputError(f"duplicate question_id {obj['question_id']!r} (first on row {seen[qid]})",
                             file=str(path), row=row, field="question_id")
        seen[qid] = row
        out.append({"question_id": obj["question_id"], "answer": obj[field], "row": row})
    return out


def _ids(xs: list[dict]) -> str:
    shown = ", ".join(repr(x["question_id"]) for x in xs[:5])
    return shown + (f", ... ({len(xs) - 5} more)" if len(xs) > 5 else "")


def score_pope(questions_path: str | Path, answers_path: str | Path) -> dict:
    """Pair answers with questions by question_id and compute the official POPE metrics."""
    questions = load_questions(questions_path)
    answers = {str(a["question_id"]): a for a in load_answers(answers_path)}
    known = {str(q["question_id"]) for q in questions}
    unknown = [a for key, a in answers.items() if key not in known]
    if unknown:
        raise InputError(f"{len(unknown)} answer(s) have a question_id not in {questions_path}: {_ids(unknown)}",
                         file=str(answers_path), row=unknown[0]["row"], field="question_id")
    missing = [q for q in questions if str(q["question_id"]) not in answers]
    if missing:
        raise InputError(f"no answer for {len(missing)} of {len(questions)} question(s) in {questions_path}: "
                         f"question_id {_ids(missing)}", file=str(answers_path))
    labels = [q["label"] for q in questions]
    preds = [parse_pope_answer(answers[str(q["question_id"])]["answer"]) for q in questions]
    return pope_metrics(labels, preds)


def pope_score_cli(questions: str | Path, answers: str | Path) -> dict:
    """Entry point for `synthalign eval pope`: returns the metrics dict (the CLI prints it as JSON)."""
    return score_pope(questions, answers)


# ---- controlled POPE on generated images -------------------------------------------------------------------


def image_file_name(prompt_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(prompt_id)) + ".png"


def controlled_pope_questions(rows: list[dict], vocab, n_neg: int = 3, strategy: str = "random",
                              seed: int = 0) -> list[dict]:
    """POPE questions about generated images: `rows` carry prompt_id and gt_objects (class names or synonyms).

    Per image, k = min(n_neg, objects present, objects absent) "yes" questions about objects the prompt put in
    the image and k "no" questions about absent classes, so labels are balanced. Absent classes are chosen as
    POPE does: uniformly ("random"), the most frequent across these rows' gt_objects ("popular"), or those
    co-occurring most often with the image's objects ("adversarial"); ties are broken by a seeded shuffle.
    Rows sharing a prompt_id (a run's pairs: one row per question about the same image) count once.
    Returns POPE question dicts (question_id from 1, image = image_file_name(prompt_id), text, label) plus
    `prompt_id` and `object`.
    """
    if strategy not in POPE_STRATEGIES:
        raise InputError(f"strategy must be one of {', '.join(POPE_STRATEGIES)}, got {strategy!r}", field="strategy")
    if n_neg < 1:
        raise InputError("n_neg must be >= 1", field="n_neg")
    images: dict[str, list[str]] = {}
    for i, r in enumerate(rows):
        gt = []
        for name in r["gt_objects"]:
            cls = vocab.canonical(name)
            if cls is None:   # a typo would turn a present object into a "no" question
                raise InputError(f"unknown object {name!r}: not in the object vocabulary", row=i + 1,
                                 field="gt_objects")
            gt.append(cls)
        images.setdefault(str(r["prompt_id"]), list(dict.fromkeys(gt)))
    freq = Counter(c for gt in images.values() for c in gt)
    cooc = Counter()
    for gt in images.values():
        for a, b in combinations(gt, 2):
            cooc[a, b] += 1
            cooc[b, a] += 1
    out = []
    for pid, gt in images.items():
        # Seeded by image, not by position: the same image gets the same questions in any subset or order.
        rng = random.Random(f"pope:{seed}:{strategy}:{pid}")
        absent = [c for c in vocab.classes if c not in gt]
        k = min(n_neg, len(gt), len(absent))
        if k == 0:
            continue
        present = rng.sample(gt, k)
        negatives = pope_negatives(rng, gt, absent, strategy, k, freq, cooc)
        for yes, no in zip(present, negatives):   # yes/no alternate, as in the POPE files
            for obj, label in ((yes, "yes"), (no, "no")):
                out.append({"question_id": len(out) + 1, "image": image_file_name(pid),
                            "text": EXISTENCE_QUESTION.format(obj), "label": label, "prompt_id": pid, "object": obj})
    return out


def write_pope_set(rows: list[dict], questions: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `questions` as a POPE question file and the rows' PNG bytes (`image`) as the files they name.

    Returns (questions.jsonl, images/), ready for `eval_pope`.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    wanted = {q["image"] for q in questions}
    for r in rows:
        name = image_file_name(r["prompt_id"])
        if name in wanted:
            (out / "images" / name).write_bytes(r["image"])
            wanted.discard(name)
    with open(out / "questions.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps(q) + "\n")
    return out / "questions.jsonl", out / "images"
