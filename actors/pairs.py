"""Preference pairs: per (image, question), chosen = highest combined reward, rejected = lowest."""
from __future__ import annotations

import math
from dataclasses import dataclass

from actors.common.errors import Problem
from actors.common.guard import guarded
from actors.common.metrics import MARGIN_BOUNDARIES, count, observe
from actors.common.objects import is_existence_question
from actors.common.runtime import with_columns
from actors.images import ImagesConfig, stored_png

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
    """The chain's last step. Besides the pairs, it readies `image` for storage: every stage before saw the full
    render; with images.store_size it leaves scaled to that size, and with images.keep_render the full render
    leaves beside it as `image_render` (not in ADDS: only with keep_render)."""
    REQUIRES = ("pair_key", "answers", "answer_models", "reward", "question", "hallucinated", "image")
    # chosen_index / rejected_index: positions in `answers`, so a copy of the chosen text is not chosen too.
    ADDS = ("pair_id", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin",
            "chosen_model", "rejected_model", "chosen_index", "rejected_index", "drop_reason")

    def __init__(self, cfg: PairsConfig, images: ImagesConfig | None = None):
        self.cfg = cfg
        self.store_size = images.store_size if images else None
        self.keep_render = bool(images and images.keep_render)

    def __call__(self, batch):
        # Outside the guard: rows that failed upstream are stored too (errors/), at the same size.
        return self._store(guarded("pairs", batch, self._process))

    def _store(self, batch):
        if "image" not in batch.column_names or (self.store_size is None and not self.keep_render):
            return batch
        import pyarrow as pa
        renders = batch.column("image").to_pylist()
        small = {}   # the questions of one image share its bytes: scale each image once
        for b in renders:
            if b is not None and b not in small:
                small[b] = stored_png(b, self.store_size)
        out = {"image": pa.array([small.get(b) for b in renders], pa.binary())}
        if self.keep_render:
            out["image_render"] = pa.array(renders, pa.binary())
        return with_columns(batch, out)

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
