"""Preference pairs: per (image, question), chosen = highest combined reward, rejected = lowest."""
from __future__ import annotations

import math
from dataclasses import dataclass

from actors.common.errors import Problem
from actors.common.guard import guarded
from actors.common.metrics import MARGIN_BOUNDARIES, count, observe
from actors.common.objects import is_existence_question
from actors.common.runtime import with_columns

DROP_REASONS = ("too_few_answers", "identical", "below_margin", "non_finite_reward", "coverage_only")


@dataclass
class PairsConfig:
    min_margin: float = 0.0            # in combined-reward units (z-scores weighted)
    # Drop a pair of an open question (a caption, not "Is there a X ...?") whose two answers hallucinate equally:
    # it only teaches naming more objects. An on-policy round has twice the share of them (docs/results.md).
    drop_coverage_only: bool = False

    def validate(self) -> list[Problem]:
        return [] if self.min_margin >= 0 else [Problem("pairs.min_margin", "must be >= 0")]


def choose(answers: list[str], models: list[str], rewards: list[float], min_margin: float):
    """(chosen index, rejected index, drop reason or None)."""
    idx = [i for i, a in enumerate(answers) if a.strip()]
    if any(not math.isfinite(rewards[i]) for i in idx):
        return None, None, "non_finite_reward"
    if len({answers[i] for i in idx}) < 2:
        return None, None, "too_few_answers" if len(idx) < 2 else "identical"
    best = max(idx, key=lambda i: rewards[i])
    worst = min(idx, key=lambda i: rewards[i])
    if answers[best] == answers[worst]:
        return None, None, "identical"
    if rewards[best] - rewards[worst] < min_margin:
        return best, worst, "below_margin"
    return best, worst, None


def coverage_only(question: str, hallucinated: list[list[str]], best: int, worst: int) -> bool:
    """An open question's pair whose chosen and rejected answers name as many absent objects each."""
    return not is_existence_question(question) and len(hallucinated[best]) == len(hallucinated[worst])


class PairBuilder:
    REQUIRES = ("pair_key", "answers", "answer_models", "reward", "question", "hallucinated")
    # chosen_index / rejected_index: positions in `answers`, so a copy of the chosen text is not chosen too.
    ADDS = ("pair_id", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin",
            "chosen_model", "rejected_model", "chosen_index", "rejected_index", "drop_reason")

    def __init__(self, cfg: PairsConfig):
        self.cfg = cfg

    def __call__(self, batch):
        return guarded("pairs", batch, self._process)

    def _process(self, batch):
        out = {k: [] for k in self.ADDS}
        n = batch.num_rows
        drop_cov = self.cfg.drop_coverage_only
        questions = batch.column("question").to_pylist() if drop_cov else [None] * n
        halluc = batch.column("hallucinated").to_pylist() if drop_cov else [None] * n
        for key, answers, models, rewards, q, h in zip(
                batch.column("pair_key").to_pylist(), batch.column("answers").to_pylist(),
                batch.column("answer_models").to_pylist(), batch.column("reward").to_pylist(), questions, halluc):
            b, w, reason = choose(answers, models, rewards, self.cfg.min_margin)
            if drop_cov and reason is None and coverage_only(q, h, b, w):
                reason = "coverage_only"
            found = b is not None
            out["pair_id"].append(key)
            out["chosen"].append(answers[b] if found else None)
            out["rejected"].append(answers[w] if found else None)
            out["chosen_reward"].append(float(rewards[b]) if found else None)
            out["rejected_reward"].append(float(rewards[w]) if found else None)
            out["margin"].append(float(rewards[b] - rewards[w]) if found else None)
            out["chosen_model"].append(models[b] if found else None)
            out["rejected_model"].append(models[w] if found else None)
            out["chosen_index"].append(b)
            out["rejected_index"].append(w)
            out["drop_reason"].append(reason)
        for reason in out["drop_reason"]:
            count("synthalign_pairs", 1, "image-questions by outcome", outcome=reason or "kept")
        observe("synthalign_margin", [m for m, r in zip(out["margin"], out["drop_reason"]) if r is None],
                "chosen - rejected reward of kept pairs", MARGIN_BOUNDARIES)
        import pyarrow as pa
        typed = {k: pa.array(v, pa.float64()) for k, v in out.items()
                 if k in ("chosen_reward", "rejected_reward", "margin")}
        typed.update({k: pa.array(out[k], pa.int32()) for k in ("chosen_index", "rejected_index")})
        typed.update({k: pa.array(v, pa.string()) for k, v in out.items() if k not in typed})
        return with_columns(batch, typed)
