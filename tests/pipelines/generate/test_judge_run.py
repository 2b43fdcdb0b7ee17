"""`generate` with the VLM judge as image scorer and as a reward term, on the tiny models and a local Ray."""
from __future__ import annotations

import pyarrow.dataset as pads
import pytest
from conftest import tiny_config


def read(path):
    return pads.dataset(str(path), format="parquet").to_table().to_pylist()


@pytest.mark.slow
def test_judge_verdicts_reach_scored_and_candidates(tiny_models, ray_local, tmp_path):
    from cluster.connect import connect
    from pipelines.generate.job import run_generate
    llava = str(tiny_models["llava"])
    cfg = tiny_config(tiny_models, tmp_path / "run", **{
        "prompts.num_prompts": 2, "prompts.instructions_per_prompt": 2, "selection.scorer": "judge",
        "selection.model": llava, "rewards.judge_model": llava, "rewards.weights.judge": 1.0})
    connect()
    manifest = run_generate(cfg)
    assert manifest["counts"]["errors"] == 0 and manifest["counts"]["questions"] == 4
    scored = read(f"{cfg.output_dir}/scored")
    assert len(scored) == 4
    for r in scored:
        # selection: one P(yes) per candidate per prompt object; the kept image has the best mean
        assert [len(v) for v in r["candidate_judge"]] == [len(r["gt_objects"])] * len(r["candidate_seeds"])
        means = [sum(v) / len(v) if v else 0.0 for v in r["candidate_judge"]]
        assert r["candidate_scores"] == pytest.approx(means) and r["image_score"] == pytest.approx(max(means))
        # rewards: one verdict per claimed object of each answer, the term counting the refuted ones
        assert len(r["judge_claims"]) == len(r["judge_p_yes"]) == len(r["answers"])
        assert [len(c) for c in r["judge_claims"]] == [len(p) for p in r["judge_p_yes"]]
        assert r["reward_judge"] == [-float(sum(p < 0.5 for p in ps)) for ps in r["judge_p_yes"]]
    assert sum(len(ps) for r in scored for ps in r["judge_p_yes"]) > 0   # the seeded answers do claim objects
    cands = read(f"{cfg.output_dir}/candidates")
    assert len(cands) == manifest["counts"]["answers"]
    by_key = {r["pair_key"]: r for r in scored}
    assert [c["reward_judge"] for c in cands] == [by_key[c["pair_key"]]["reward_judge"][c["candidate_index"]]
                                                  for c in cands]
