"""`python -m pipelines.bench.shapes` on an iterative config: a row per round under the base, changes against it."""
from __future__ import annotations

from pipelines.bench.shapes import rounds_table, table, verdict


def metrics(acc, yes, ci, cs, cov):
    return {"pope": {"accuracy": acc, "yes_ratio": yes}, "chair": {"chair_i": ci, "chair_s": cs, "coverage": cov}}


def test_rounds_table_and_verdict_on_the_last_round():
    rounds = [{"round": r, **metrics(0.80 + 0.05 * r, 0.5, 0.2 - 0.05 * r, 0.3, 0.8), "pairs": 100 * r,
               "train_steps": 10, "seconds": 60.0 * r} for r in (1, 2, 3)]
    row = {"seed": 0, "base": metrics(0.8, 0.7, 0.2, 0.4, 0.75), "adapter": rounds[-1], "rounds": rounds,
           "pairs": 600, "seconds": {"total": 600.0}}
    text = rounds_table([row])
    lines = text.splitlines()
    assert len(lines) == 2 + 4 and lines[2].startswith("| 0 | base | 0.800 |")
    assert lines[3] == "| 0 | round 1 | 0.850 | +5.0 | 0.50 | 0.150 | -25% | 0.30 | 0.80 | 100 | 1.0 |"
    assert lines[5] == "| 0 | round 3 | 0.950 | +15.0 | 0.50 | 0.050 | -75% | 0.30 | 0.80 | 300 | 3.0 |"
    v = verdict([row])
    assert abs(v["pope_gain_points"][0] - 15) < 1e-9
    assert all(v["checks"].values()) and "| 0 | 0.800 | 0.950 | +15.0 |" in table([row], v)
