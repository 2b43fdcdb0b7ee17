import json
from pathlib import Path

import pytest
from conftest import DATA

from actors.common.errors import InputError
from pipelines.evaluate.mmhal import (
    JUDGE_TEMPLATE,
    RUBRIC,
    build_judge_prompt,
    load_template,
    mmhal_metrics,
    mmhal_score_cli,
    parse_rating,
    score_reviews,
)

TEMPLATE = DATA / "mmhal" / "mmhal-bench_answer_template.json"
TYPES = ["attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other"]


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE)


@pytest.mark.parametrize("review, expected", [
    ("Explanation ... Rating: 5, very informative, no hallucination", 5),
    ("rating: 0", 0),
    ("RATING: 6", 6),
    ("The response is fine.", 0),                               # no match
    ("Rating: 2 ... on reflection, Rating: 4", 0),              # several different matches
    ("Rating: 3. I repeat, rating: 3", 3),                      # one value found twice is one match
    ("Rating:4", 0),                                            # official needs "rating: " with the space
    ("Rating: 16", 1),                                          # substring test, as the official script
    ("", 0),
])
def test_parse_rating(review, expected):
    assert parse_rating(review) == expected


def test_metrics_hand_computed():
    items = [{"question_type": "a", "rating": 6}, {"question_type": "b", "rating": 2},
             {"question_type": "a", "rating": 3}, {"question_type": "b", "rating": 0}]
    assert mmhal_metrics(items) == {"n": 4, "score": 11 / 4, "hallucination_rate": 0.5,
                                    "per_type": {"a": 4.5, "b": 1.0}}
    assert mmhal_metrics([]) == {"n": 0, "score": 0.0, "hallucination_rate": 0.0, "per_type": {}}


def test_real_template_loads_with_8_types(template):
    assert len(template) == 96
    assert list(dict.fromkeys(it["question_type"] for it in template)) == TYPES
    assert [it["question_type"] for it in template[:8]] == TYPES     # the official index % 8 order holds
    assert all(it["model_answer"] == "" for it in template)


def test_judge_prompt(template):
    item = dict(template[0], model_answer="The cap is red.")
    prompt = build_judge_prompt(item)
    assert prompt.startswith("Please act as an impartial and objective judge and evaluate the quality")
    assert prompt.endswith("### Image Contents\nFire hydrant\n\n### Question\nWhat color is the fire hydrant cap "
                           "in the picture?\n\n### Standard Human-Generated Answer\nThe color of the fire "
                           "hydrant cap in the image is yellow.\n\n### LMM Response to Evaluate\nThe cap is red.\n")
    assert "so please be a bit more cautious during evalutation." in prompt      # official typo kept
    for s, desc in RUBRIC.items():
        assert f"- Rating: {s}, {desc}\n" in prompt
    assert prompt.index("- Rating: 6,") < prompt.index("- Rating: 0,")
    assert JUDGE_TEMPLATE.count("{}") == 4 and prompt.count("### Example") == 5
    multi = build_judge_prompt(dict(item, image_content=["Tree", "Tower"]))
    assert "### Image Contents\nTree, Tower\n" in multi
    braces = build_judge_prompt(dict(item, model_answer="a {b} c"))            # answers are not re-formatted
    assert braces.endswith("a {b} c\n")


def test_score_reviews(tmp_path, template):
    ratings = [i % 7 for i in range(96)]
    items = [dict(it, model_answer="x", review=f"Short explanation.\nRating: {r}, ...") for it, r in
             zip(template, ratings)]
    items[5]["review"] = "no rating here"           # -> 0
    ratings[5] = 0
    path = tmp_path / "reviews.json"
    path.write_text(json.dumps(items))
    m = mmhal_score_cli(path)
    assert m["n"] == 96
    assert m["score"] == pytest.approx(sum(ratings) / 96)
    assert m["hallucination_rate"] == pytest.approx(sum(r < 3 for r in ratings) / 96)
    assert list(m["per_type"]) == TYPES
    for k, t in enumerate(TYPES):
        assert m["per_type"][t] == pytest.approx(sum(ratings[k::8]) / 12)


def _write(tmp_path, data) -> Path:
    path = tmp_path / "t.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_malformed_templates(tmp_path, template):
    good = dict(template[0])
    cases = [
        ("[{", None, None, "not valid JSON"),
        ({"items": []}, None, None, "non-empty JSON array"),
        ([], None, None, "non-empty JSON array"),
        ([good, "x"], 2, None, "index 1 is not a JSON object"),
        ([good, {k: v for k, v in good.items() if k != "gt_answer"}], 2, "gt_answer", "missing field"),
        ([dict(good, image_content="Fire hydrant")], 1, "image_content", "a list of strings"),
        ([dict(good, image_content=[1])], 1, "image_content", "a list of strings"),
        ([good, good, dict(good, question=None)], 3, "question", "must be a string (item at index 2)"),
    ]
    for data, row, field, text in cases:
        path = _write(tmp_path, data)
        with pytest.raises(InputError) as e:
            load_template(path)
        assert (e.value.file, e.value.row, e.value.field) == (str(path), row, field), data
        assert text in str(e.value)
    with pytest.raises(InputError, match="cannot read MMHal-Bench file"):
        load_template(tmp_path / "missing.json")


def test_score_reviews_requires_review(tmp_path, template):
    path = _write(tmp_path, [dict(template[0], model_answer="x")])
    with pytest.raises(InputError) as e:
        score_reviews(path)
    assert (e.value.row, e.value.field) == (1, "review")
