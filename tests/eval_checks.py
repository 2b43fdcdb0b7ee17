"""What a run's eval/summary.json says, recomputed from its eval/answers-{base,adapter}.jsonl with the official
scorers (POPE's parser and metrics, CHAIR) and the run's own object vocabulary (from its manifest's config)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.rewards import load_vocab
from pipelines.config import RunConfig
from pipelines.evaluate.chair import chair
from pipelines.evaluate.pope import parse_pope_answer, pope_metrics
from pipelines.typed import from_dict

POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def run_vocab(run: Path):
    cfg = from_dict(RunConfig, json.loads((run / "manifest.json").read_text())["config"])
    return load_vocab(cfg.rewards, cfg.prompts.source)


def assert_summary_follows_from_answers(run: Path) -> dict:
    summary = json.loads((run / "eval" / "summary.json").read_text())
    vocab = run_vocab(run)
    for model in ("base", "adapter"):
        records = [json.loads(x) for x in (run / "eval" / f"answers-{model}.jsonl").read_text().splitlines()]
        pope = [r for r in records if "label" in r]
        captions = [r for r in records if "label" not in r]
        assert [r["image"] for r in captions] == list(range(summary["images"]))
        gt = [r["gt_objects"] for r in captions]
        for r in pope:   # the recorded label is the truth about the image, not whatever was scored
            assert (vocab.asked_object(r["question"]) in gt[r["image"]]) == (r["label"] == "yes"), r
        strategies = list(summary[model]["pope_by_strategy"])
        assert set(strategies) == {t for r in pope for t in r["strategies"]}, model
        per = {}
        for s in strategies:
            rows = [r for r in pope for t in r["strategies"] if t == s]
            per[s] = pope_metrics([r["label"] for r in rows], [parse_pope_answer(r["answer"]) for r in rows])
            got = summary[model]["pope_by_strategy"][s]
            assert got["n"] == per[s]["n"] > 0, (model, s)
            assert {k: got[k] for k in POPE_KEYS} == pytest.approx({k: per[s][k] for k in POPE_KEYS}), (model, s)
        mean = {k: sum(per[s][k] for s in strategies) / len(strategies) for k in POPE_KEYS}
        assert summary[model]["pope"] == pytest.approx(mean), model
        ch = chair([r["answer"] for r in captions], gt, vocab)
        got = summary[model]["chair"]
        assert (got["chair_i"], got["chair_s"]) == pytest.approx((ch["chair_i"], ch["chair_s"])), model
        assert (got["mentioned"], got["hallucinated"]) == (ch["mentioned"], ch["hallucinated"]), model
    return summary
