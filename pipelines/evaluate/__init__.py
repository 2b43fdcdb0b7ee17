"""Hallucination benchmarks scored in pure Python (no torch): POPE, MMHal-Bench, CHAIR.

Generation of the answers being scored happens elsewhere; these modules only parse answer/review files and
compute the official metrics, so they run on a laptop and in CI.
"""
from pipelines.evaluate.chair import chair
from pipelines.evaluate.mmhal import build_judge_prompt, mmhal_metrics, mmhal_score_cli, parse_rating, score_reviews
from pipelines.evaluate.pope import parse_pope_answer, pope_metrics, pope_score_cli, score_pope

__all__ = ["chair", "build_judge_prompt", "mmhal_metrics", "mmhal_score_cli", "parse_rating", "score_reviews",
           "parse_pope_answer", "pope_metrics", "pope_score_cli", "score_pope"]
