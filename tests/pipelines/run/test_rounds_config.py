"""`rounds: N` without running anything: the shipped iterative config, what each round's config is, what the
hashes keep, what is refused, and the per-round report."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT

from actors.common.errors import InputError
from actors.prompts import load_prompts
from pipelines.config import load_config
from pipelines.folder import RunFolder
from pipelines.run.rounds import prepare_rounds, round_config, round_configs


def test_shapes_rounds_config_makes_three_chained_rounds():
    from actors.common import shapes
    cfg = load_config(ROOT / "configs" / "shapes-rounds.yaml")
    assert cfg.rounds == 3 and cfg.samplers[0].on_policy and cfg.train.reference == "previous"
    rounds = round_configs(cfg)
    assert [c.output_dir for c in rounds] == [f"runs/shapes-rounds/rounds/{r}" for r in (1, 2, 3)]
    ids = [{p["prompt_id"] for p in load_prompts(c.prompts)} for c in rounds]
    assert all(len(x) == 400 for x in ids) and len(set().union(*ids)) == 1200
    held_out = {shapes.make_prompt(0, i, "eval")["prompt_id"] for i in range(cfg.eval.num_images)}
    assert not set().union(*ids) & held_out
    assert rounds[0].train.init_adapter is None and rounds[0].samplers[0].adapter is None
    for prev, c in zip(rounds, rounds[1:]):
        adapter = f"{prev.output_dir}/train/adapter"
        assert c.previous == prev.train_hash() and c.train.init_adapter == adapter
        assert c.samplers[0].adapter == adapter and not c.samplers[0].on_policy and c.eval is None
    assert len({c.hash() for c in rounds}) == 3
    assert [c.pairs.drop_coverage_only for c in rounds] == [False, True, True]   # later_rounds
    # an on_policy sampler samples the policy being trained, whatever model it names
    moved = load_config(ROOT / "configs" / "shapes-rounds.yaml", ["train.model=elsewhere/llava"])
    assert all(c.samplers[0].model == "elsewhere/llava" for c in round_configs(moved))


def test_new_keys_stay_out_of_the_hashes_at_their_defaults():
    """A folder made before `rounds` existed still matches its config."""
    for name in ("tiny", "shapes", "paper"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        data, train = cfg.data_dict(), cfg.train_dict()
        assert "previous" not in data and "rounds" not in data and "round" not in data["prompts"]
        assert all("on_policy" not in s for s in data["samplers"])
        assert "init_adapter" not in train and "reference" not in train
        assert cfg.hash() == load_config(ROOT / "configs" / f"{name}.yaml", ["rounds=3"]).hash()
    # round 1 of an iterative run is the same run as the config with `rounds: 1`
    one = load_config(ROOT / "configs" / "shapes-rounds.yaml", ["rounds=1"])
    one.samplers[0].on_policy = False
    r1 = round_config(load_config(ROOT / "configs" / "shapes-rounds.yaml"), 1)
    assert (r1.hash(), r1.train_hash()) == (one.hash(), one.train_hash())


@pytest.mark.parametrize("sets,key", [
    (["rounds=0"], "rounds"),
    (["prompts.source=file", "prompts.file=p.txt"], "rounds"),
    (["samplers=[{model: .synthalign/shapes/llava, backend: vllm, on_policy: true}]"], "samplers[0].on_policy"),
    (["samplers=[{model: .synthalign/shapes/llava, adapter: a, on_policy: true}]"], "samplers[0].adapter"),
    (["train.reference=sft"], "train.reference"),
    (["train.init_adapter=somewhere"], "train.init_adapter"),
    (["train.data=pairs"], "train.data"),
])
def test_what_an_iterative_run_refuses(sets, key):
    with pytest.raises(InputError, match=f"field {re.escape(repr(key))}"):
        load_config(ROOT / "configs" / "shapes-rounds.yaml", sets)


def test_a_changed_round_1_recipe_is_refused_before_anything_is_removed(tmp_path):
    cfg = load_config(ROOT / "configs" / "shapes-rounds.yaml", [f"output_dir={tmp_path / 'run'}"])
    for c in round_configs(cfg)[:2]:   # two rounds as a finished run left them
        folder = RunFolder(c)
        folder.prepare()
        folder.write_manifest({"status": "complete"})
        folder.claim_train()
    changed = load_config(ROOT / "configs" / "shapes-rounds.yaml", [f"output_dir={tmp_path / 'run'}", "train.beta=0.2"])
    assert round_config(changed, 2).hash() != round_config(cfg, 2).hash()   # round 2 sampled round 1's policy
    assert round_config(changed, 1).hash() == round_config(cfg, 1).hash()
    with pytest.raises(InputError, match=r"rounds/1: holds a training run of another recipe \(changed: train.beta\)"):
        prepare_rounds(changed)
    assert all((tmp_path / "run" / "rounds" / str(r) / "train" / "recipe.json").exists() for r in (1, 2))


def test_a_one_round_run_folder_is_not_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"data_hash": "0123456789abcdef", "status": "complete"}))
    cfg = load_config(ROOT / "configs" / "shapes-rounds.yaml", [f"output_dir={run}"])
    with pytest.raises(InputError, match="holds a one-round run"):
        prepare_rounds(cfg)
    assert json.loads((run / "manifest.json").read_text())["data_hash"] == "0123456789abcdef"


def test_rounds_report(tmp_path):
    from pipelines.report.report import write_report
    run = tmp_path / "run"
    run.mkdir()
    m = lambda acc, ci: {"pope": {"accuracy": acc, "yes_ratio": 0.5}, "chair": {"chair_i": ci, "chair_s": 0.3}}  # noqa: E731
    (run / "manifest.json").write_text(json.dumps({"status": "complete", "rounds": [
        {"round": r, "output_dir": f"{run}/rounds/{r}", "counts": {"pairs": 10 * r},
         "train": {"steps": 3, "final_loss": 0.5}} for r in (1, 2)]}))
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps({"base": m(0.7, 0.4), "rounds": [
        {"round": 1, **m(0.75, 0.3)}, {"round": 2, **m(0.8, 0.2)}]}))
    md, html = write_report(run)
    text = md.read_text()
    assert "| base | — | — | — | 0.700 | 0.500 | 0.400 | 0.300 |" in text
    assert "| 2 | 20 | 3 | 0.500 | 0.800 | 0.500 | 0.200 | 0.300 |" in text
    assert Path(run / "report" / "rounds.png").stat().st_size > 1000 and "data:image/png" in html.read_text()


def test_later_rounds_settings_apply_from_round_2_and_leave_round_1_as_it_was():
    path = ROOT / "configs" / "shapes-rounds.yaml"
    plain = load_config(path)
    cfg = load_config(path, ["later_rounds={pairs: {drop_coverage_only: true, min_margin: 0.3}}"])
    r1, r2, r3 = round_configs(cfg)
    assert not r1.pairs.drop_coverage_only and r1.pairs.min_margin == 0.1
    assert all(c.pairs.drop_coverage_only and c.pairs.min_margin == 0.3 for c in (r2, r3))
    assert all(c.later_rounds is None for c in (r1, r2, r3))
    # round 1 is the same run as without the key; later rounds are other data, chained as before
    assert (r1.hash(), r1.train_hash()) == (round_config(plain, 1).hash(), round_config(plain, 1).train_hash())
    assert r2.hash() != round_config(plain, 2).hash() and r3.previous == r2.train_hash()
    assert r2.samplers[0].adapter == f"{r1.output_dir}/train/adapter"


def test_later_rounds_may_replace_the_samplers_and_keep_one_on_policy():
    samplers = "[{model: .synthalign/shapes/llava, name: p, n: 9, temperature: 1.2, on_policy: true}]"
    cfg = load_config(ROOT / "configs" / "shapes-rounds.yaml", ["train.model=m/llava",
                                                                 f"later_rounds={{samplers: {samplers}}}"])
    r1, r2, _ = round_configs(cfg)
    assert (r1.samplers[0].n, r1.samplers[0].temperature) == (6, 1.0)
    s = r2.samplers[0]
    assert (s.n, s.temperature, s.model, s.adapter, s.on_policy) == (9, 1.2, "m/llava",
                                                                     f"{r1.output_dir}/train/adapter", False)


@pytest.mark.parametrize("value,key", [
    ("{pairs: {min_margin: -1}}", "later_rounds.pairs.min_margin"),
    ("{pairs: {nope: 1}}", "later_rounds.pairs.nope"),
    ("{rounds: 2}", "later_rounds.rounds"),
    ("{output_dir: x}", "later_rounds.output_dir"),
])
def test_later_rounds_are_checked_on_load(value, key):
    with pytest.raises(InputError, match=f"field {re.escape(repr(key))}"):
        load_config(ROOT / "configs" / "shapes-rounds.yaml", [f"later_rounds={value}"])
