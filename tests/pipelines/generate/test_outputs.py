"""The views `finalize` derives from `scored/`: `candidates/` carries every reward term the rewards stage adds,
and its roles come from the chosen and rejected indices, not from matching answer text."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from actors.pairs import PairBuilder, PairsConfig
from actors.rewards import TERMS, RewardsConfig, RewardScorer
from pipelines.generate.outputs import finalize

ANSWERS = [["a cat on a couch", "a dog on a couch", "a cat on a couch"],  # chosen text again at index 2
           ["a cat", "a cat"]]                                             # identical: no pair


@pytest.fixture
def run_dir(tmp_path, coco_vocab):
    """A scored/ shard made by the real rewards and pairs stages (no models: hallucination and coverage)."""
    rows = pa.table({"pair_key": ["p1-q0", "p2-q0"], "prompt_id": ["p1", "p2"], "image": [b"", b""],
                     "question": ["Describe the image.", "Describe the image."],
                     "answers": ANSWERS, "answer_models": [["m-a", "m-a", "m-b"], ["m-a", "m-b"]],
                     "gt_objects": [["cat", "couch"], ["cat"]]})
    cfg = RewardsConfig(weights={"hallucination": 1.0, "coverage": 1.0})
    scored = PairBuilder(PairsConfig())(RewardScorer(cfg, coco_vocab)(rows))
    (tmp_path / "scored").mkdir()
    pq.write_table(scored, tmp_path / "scored" / "shard-0.parquet")
    return tmp_path, scored.to_pylist()


def candidates(out):
    return sorted(pads.dataset(str(out / "candidates"), format="parquet").to_table().to_pylist(),
                  key=lambda c: (c["pair_key"], c["candidate_index"]))


def test_candidates_carry_every_reward_term(run_dir):
    out, scored = run_dir
    counts = finalize(out, 1000)
    cands = candidates(out)
    assert len(cands) == counts["answers"] == 5
    per_candidate = set(RewardScorer.ADDS)  # every term, `hallucinated` and the combined `reward`
    assert {f"reward_{t}" for t in TERMS} <= per_candidate <= set(cands[0])
    by_key = {r["pair_key"]: r for r in scored}
    for c in cands:
        for col in per_candidate:
            assert c[col] == by_key[c["pair_key"]][col][c["candidate_index"]], col
    coverage = [c["reward_coverage"] for c in cands if c["pair_key"] == "p1-q0"]
    assert coverage == [1.0, 0.5, 1.0]  # "dog" is not in the image; cat and couch are


def test_roles_come_from_the_chosen_and_rejected_indices(run_dir):
    out, scored = run_dir
    finalize(out, 1000)
    roles = {(c["pair_key"], c["candidate_index"]): c["role"] for c in candidates(out)}
    assert scored[0]["chosen"] == ANSWERS[0][0] == ANSWERS[0][2] and scored[0]["rejected"] == ANSWERS[0][1]
    assert [roles[("p1-q0", j)] for j in range(3)] == ["chosen", "rejected", ""]  # the copy is no second chosen
    assert scored[1]["drop_reason"] == "identical"
    assert [roles[("p2-q0", j)] for j in range(2)] == ["", ""]
