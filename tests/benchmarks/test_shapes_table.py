"""`python -m benchmarks.shapes` on an iterative config: a row per round under the base, changes against it."""
from __future__ import annotations

from benchmarks.shapes import rounds_table, table, verdict


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


def test_the_bench_runs_an_iterative_config_round_by_round(ray_local, tmp_path):
    """The bench's path for `rounds` > 1 on a barely pretrained base (as test_shapes_world's) and a few prompts."""
    import json
    import time

    from conftest import ROOT

    from benchmarks.shapes import _run_rounds
    from pipelines.config import load_config
    from pipelines.models.pretrain import make_shapes_base
    base = make_shapes_base(tmp_path / "models", spec={"vision_steps": 5, "steps": 40, "batch": 8},
                            guard={"min_held_out_yes_no": 0.0}, log=lambda m: None)   # near chance on purpose
    sets = [f"output_dir={tmp_path / 'run'}", "tiny_models=null", f"train.model={base}", "rounds=2",
            "samplers=[{model: %s, name: policy, n: 3, temperature: 1.0, max_new_tokens: 8, on_policy: true}]" % base,
            "prompts.num_prompts=6", "prompts.instructions_per_prompt=2", "pairs.min_margin=0.0",
            "train.max_steps=2", "train.per_device_batch_size=2", "eval.num_images=4", "eval.caption_tokens=8"]
    cfg = load_config(ROOT / "configs" / "shapes-rounds.yaml", sets)
    pretrain = json.loads((base / "pretrain.json").read_text())
    row = _run_rounds(cfg, 0, pretrain, 1.0, time.time(), log=lambda m: None)
    assert [r["round"] for r in row["rounds"]] == [1, 2] and row["train_steps"] == 4
    assert row["pairs"] == sum(r["pairs"] for r in row["rounds"]) > 0
    assert row["adapter"]["pope"] == row["rounds"][1]["pope"] and set(row["seconds"]) >= {"round 1", "round 2"}
    assert len(rounds_table([row]).splitlines()) == 2 + 3


def test_bench_json_holds_the_seeds_finished_so_far(tmp_path):
    """Written after every seed: a run stopped part way leaves the finished rows, their verdict and what was left."""
    import argparse
    import json

    from benchmarks.shapes import write_bench
    row = {"seed": 3, "base": metrics(0.8, 0.7, 0.2, 0.4, 0.75), "adapter": metrics(0.9, 0.5, 0.1, 0.2, 0.8),
           "pairs": 10, "seconds": {"total": 300.0}}
    args = argparse.Namespace(seeds=[3, 4, 5], config="configs/shapes.yaml", overrides=[])
    write_bench(tmp_path, [row], args)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["pending"] == [4, 5] and [r["seed"] for r in data["rows"]] == [3]
    assert abs(data["verdict"]["pope_gain_points"][0] - 10) < 1e-9 and data["verdict"]["checks"]


def seed_row(seed, acc1, acc2, ci1, ci2, minutes=10.0):
    """A rounds row from hand-made numbers: base, round 1 and round 2 (the last, so also the adapter)."""
    rounds = [{"round": r, **metrics(acc, 0.5, ci, 0.2, 0.9), "pairs": 100, "train_steps": 10, "seconds": 60.0}
              for r, acc, ci in ((1, acc1, ci1), (2, acc2, ci2))]
    return {"seed": seed, "base": metrics(0.70, 0.7, 0.20, 0.4, 0.8), "adapter": rounds[-1], "rounds": rounds,
            "pairs": 200, "seconds": {"pretrain": 120.0, "total": 60 * minutes}}


def test_rounds_verdict_checks_round_2_against_round_1_on_every_seed():
    from benchmarks.shapes import report, rounds_verdict
    good = [seed_row(0, 0.80, 0.84, 0.10, 0.08), seed_row(1, 0.75, 0.79, 0.12, 0.12)]
    rv = rounds_verdict(good)
    assert rv["met"] and [round(s["pope_gain_points"], 6) for s in rv["seeds"]] == [4.0, 4.0]
    assert abs(rv["mean_pope_gain_points"] - 4.0) < 1e-9 and rv["seeds"][1]["chair_i_change"] == 0.0
    assert report(good)[1] is True
    # One seed where round 2 loses 1 point: the mean is still +2.3 but "every seed" fails.
    one_fails = good + [seed_row(2, 0.80, 0.79, 0.10, 0.09)]
    rv = rounds_verdict(one_fails)
    assert not rv["met"] and rv["seeds"][2]["met"] == {"pope": False, "chair_i": True, "minutes": True}
    assert [name for name, ok in rv["checks"].items() if not ok] == ["round 2 beats round 1 on POPE on every seed"]
    # CHAIR_i up on one seed, POPE fine everywhere: not met; the printout names the seed's miss.
    rise = [good[0], seed_row(1, 0.75, 0.79, 0.12, 0.13)]
    rv = rounds_verdict(rise)
    assert not rv["met"] and [s["met"]["chair_i"] for s in rv["seeds"]] == [True, False]
    text, met = report(rise)
    assert not met and "| 1 | +4.0 | 0.120 → 0.130 | 10.0 (2.0) | no: chair_i |" in text
    # A mean gain under 2 points, and a seed over 25 minutes counting its base build, each fail on their own.
    assert not rounds_verdict([seed_row(0, 0.80, 0.81, 0.1, 0.1)])["met"]
    slow = rounds_verdict([seed_row(0, 0.80, 0.83, 0.1, 0.1, minutes=26.0)])
    assert not slow["met"] and slow["seeds"][0]["met"]["minutes"] is False
    # A one-round run has no rounds verdict; its exit follows the one-round targets.
    flat = {k: v for k, v in good[0].items() if k != "rounds"}
    assert rounds_verdict([flat]) is None and report([flat])[1] is True


def test_reread_prints_the_verdicts_of_a_saved_bench_json(tmp_path, capsys):
    import argparse
    import json

    from benchmarks.shapes import main, write_bench
    rows = [seed_row(0, 0.80, 0.83, 0.10, 0.08), seed_row(1, 0.75, 0.78, 0.12, 0.13)]
    write_bench(tmp_path, rows, argparse.Namespace(seeds=[0, 1], config="configs/shapes-rounds.yaml", overrides=[]))
    saved = json.loads((tmp_path / "bench.json").read_text())["rounds_verdict"]
    assert [s["met"]["chair_i"] for s in saved["seeds"]] == [True, False] and saved["met"] is False
    assert main(["--reread", str(tmp_path / "bench.json")]) == 1
    assert "[ ] CHAIR_i no worse in round 2 on every seed" in capsys.readouterr().out
