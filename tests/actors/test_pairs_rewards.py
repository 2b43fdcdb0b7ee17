from __future__ import annotations

import math

import pyarrow as pa
import pytest

from actors.contract import ContractError, check_chain
from actors.pairs import PairBuilder, PairsConfig, choose
from actors.rewards import combine, znorm


def test_choose_best_and_worst():
    assert choose(["a", "b", "c"], ["m1", "m2", "m3"], [0.1, 0.9, -0.5], 0.0) == (1, 2, None)


@pytest.mark.parametrize("answers,rewards,margin,reason", [
    (["a", "a", "a"], [1, 2, 3], 0.0, "identical"),
    (["a", "", " "], [1, 2, 3], 0.0, "too_few_answers"),
    (["a", "b"], [1.0, 1.2], 0.5, "below_margin"),
    (["a", "b"], [1.0, math.nan], 0.0, "non_finite_reward"),
])
def test_choose_drops(answers, rewards, margin, reason):
    assert choose(answers, ["m"] * len(answers), rewards, margin)[2] == reason


def test_empty_answers_are_never_chosen():
    b, w, reason = choose(["", "x", "y"], ["m"] * 3, [-9.0, 1.0, 0.0], 0.0)
    assert (b, w, reason) == (1, 2, None)


def test_znorm_and_combine():
    assert znorm([1.0, 2.0, 3.0]) == pytest.approx([-1.2247449, 0.0, 1.2247449])
    assert znorm([2.0, 2.0]) == [0.0, 0.0] and znorm([5.0]) == [0.0]
    total = combine({"text": [0.0, 10.0], "hallucination": [0.0, -2.0]}, {"text": 1.0, "hallucination": 2.0})
    # z(text) = [-1, 1], z(halluc) = [1, -1] -> 1*[-1,1] + 2*[1,-1]
    assert total == pytest.approx([1.0, -1.0])
    assert combine({"text": [1.0, 2.0], "clip": [5.0, 1.0]}, {"text": 1.0}) == pytest.approx([-1.0, 1.0])


def test_pair_builder_columns_and_margin():
    t = pa.table({"pair_key": ["k1", "k2"], "answers": [["x", "y", "z"], ["same", "same"]],
                  "answer_models": [["a", "b", "c"], ["a", "b"]], "reward": [[0.5, -1.0, 2.0], [1.0, 0.0]]})
    rows = PairBuilder(PairsConfig(min_margin=0.1))(t).to_pylist()
    assert rows[0]["chosen"] == "z" and rows[0]["rejected"] == "y" and rows[0]["chosen_model"] == "c"
    assert rows[0]["margin"] == pytest.approx(3.0) and rows[0]["drop_reason"] is None
    assert rows[1]["drop_reason"] == "identical" and rows[1]["chosen"] is None


def test_contract_names_the_stage_and_missing_column():
    class A:
        REQUIRES, ADDS = ("x",), ("y",)

    class B:
        REQUIRES, ADDS, DROPS = ("y",), ("z",), ("x",)

    class C:
        REQUIRES = ("x",)

    assert check_chain(["x"], [A, B]) == ["y", "z"]
    with pytest.raises(ContractError, match=r"stage C needs column\(s\) \['x'\]"):
        check_chain(["x"], [A, B, C])


def test_reward_buckets_cover_signed_values():
    from actors.common.metrics import reward_bucket
    assert [reward_bucket(v) for v in (-5, -1.5, -0.5, 0.0, 0.7, 9)] == \
        ["<-2.0", "[-2.0,-1.0)", "[-0.5,0.0)", "[0.0,0.5)", "[0.5,1.0)", ">=2.0"]


def test_pair_builder_records_chosen_and_rejected_indices():
    """The indices travel with the row, so candidates/ labels the chosen answer, not every copy of its text."""
    t = pa.table({"pair_key": ["k1", "k2", "k3"], "answers": [["x", "y", "x"], ["same", "same"], ["a", "b"]],
                  "answer_models": [["a", "b", "c"], ["a", "b"], ["a", "b"]],
                  "reward": [[2.0, -1.0, 0.5], [1.0, 0.0], [1.0, 1.1]]})
    out = PairBuilder(PairsConfig(min_margin=0.5))(t)
    assert {"chosen_index", "rejected_index"} <= set(PairBuilder.ADDS) <= set(out.column_names)
    rows = out.to_pylist()
    assert (rows[0]["chosen_index"], rows[0]["rejected_index"]) == (0, 1)
    assert (rows[1]["chosen_index"], rows[1]["rejected_index"]) == (None, None)  # identical: no pair
    assert (rows[2]["chosen_index"], rows[2]["rejected_index"], rows[2]["drop_reason"]) == (1, 0, "below_margin")


def test_drop_coverage_only_drops_open_questions_whose_answers_hallucinate_alike():
    caption, exists = "Describe this image.", "Is there a red circle in the image?"
    t = pa.table({"pair_key": ["k1", "k2", "k3", "k4"], "question": [caption, caption, exists, caption],
                  "answers": [["a red square", "a red square and a blue circle", "a red square, a green star"]] * 2
                  + [["Yes", "No"], ["x", "y"]],
                  "answer_models": [["m", "m", "m"]] * 2 + [["m", "m"]] * 2,
                  "hallucinated": [[[], [], []], [[], [], ["green star"]], [[], []], [["a"], ["b"]]],
                  "reward": [[0.0, 2.0, -1.0], [0.0, 2.0, -1.0], [1.0, -1.0], [1.0, -1.0]]})
    keep = PairBuilder(PairsConfig())(t).column("drop_reason").to_pylist()
    rows = PairBuilder(PairsConfig(drop_coverage_only=True))(t).to_pylist()
    assert keep == [None] * 4
    # k1: chosen and rejected both clean; k4: one hallucination each; k2 rejects a hallucination; k3 asks
    assert [r["drop_reason"] for r in rows] == ["coverage_only", None, None, "coverage_only"]
    assert rows[1]["rejected"] == "a red square, a green star"
