import json
from pathlib import Path

import pytest
from conftest import DATA

from actors.common.errors import InputError
from pipelines.evaluate.pope import (
    load_answers,
    load_questions,
    parse_pope_answer,
    pope_metrics,
    pope_score_cli,
    score_pope,
)


def pope_file(name: str) -> Path:
    return DATA / "pope" / name


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("text, expected", [
    ("No.", "no"),
    ("no, there is", "no"),
    ("NO", "yes"),                          # case-sensitive token match, as the official script
    ("", "yes"),
    ("Yes, not sure", "no"),                # "not" anywhere in the first sentence
    ("There is a dog. No", "yes"),          # only the first sentence counts
    ("Yes", "yes"),
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no car in the image.", "no"),
    ("No", "no"),
    ("Nope", "yes"),
    ("There is none", "yes"),               # "none" is not a negative token in the official list
    ("I cannot tell", "yes"),
    ("no\nthere is", "yes"),                # split on single spaces only: the token is "no\nthere"
    ("Yes,no", "yes"),                      # comma removed -> "Yesno"
    ("Yes , no", "no"),
    (". No", "yes"),                        # first sentence is empty
])
def test_parse_pope_answer(text, expected):
    assert parse_pope_answer(text) == expected


def test_metrics_hand_computed():
    # TP=2 FN=1 FP=1 TN=1
    m = pope_metrics(["yes", "yes", "yes", "no", "no"], ["yes", "no", "yes", "yes", "no"])
    assert m == pytest.approx({"n": 5, "accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                               "yes_ratio": 0.6})
    # TP=1 FP=1 TN=2 FN=0
    m = pope_metrics(["yes", "no", "no", "no"], ["yes", "yes", "no", "no"])
    assert m == pytest.approx({"n": 4, "accuracy": 0.75, "precision": 0.5, "recall": 1.0, "f1": 2 / 3,
                               "yes_ratio": 0.5})


def test_metrics_zero_denominators():
    assert pope_metrics(["no", "no"], ["no", "no"]) == {"n": 2, "accuracy": 1.0, "precision": 0.0,
                                                         "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert pope_metrics(["yes"], ["no"]) == {"n": 1, "accuracy": 0.0, "precision": 0.0, "recall": 0.0,
                                             "f1": 0.0, "yes_ratio": 0.0}
    assert pope_metrics([], []) == {"n": 0, "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                    "yes_ratio": 0.0}


def test_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="2 labels but 1"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="'Yes'"):
        pope_metrics(["yes"], ["Yes"])


def test_real_file_all_yes_and_all_no(tmp_path):
    questions = pope_file("coco_pope_random.json")
    qs = load_questions(questions)
    assert len(qs) == 3000 and qs[0]["question_id"] == 1
    yes = write_jsonl(tmp_path / "yes.jsonl", [{"question_id": q["question_id"], "text": "Yes."} for q in qs])
    assert score_pope(questions, yes) == pytest.approx(
        {"n": 3000, "accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0})
    no = write_jsonl(tmp_path / "no.jsonl", [{"question_id": q["question_id"], "answer": "No"} for q in qs])
    assert score_pope(questions, no) == {"n": 3000, "accuracy": 0.5, "precision": 0.0, "recall": 0.0,
                                         "f1": 0.0, "yes_ratio": 0.0}


def test_real_file_perfect_answers_in_any_order(tmp_path):
    questions = pope_file("llava15-pinned/coco_pope_random.json")   # 1500 yes / 1410 no
    qs = load_questions(questions)
    rows = [{"question_id": str(q["question_id"]), "text": q["label"].capitalize() + ", it is."}
            for q in reversed(qs)]                                   # reordered, ids as strings
    m = pope_score_cli(questions, write_jsonl(tmp_path / "a.jsonl", rows))
    assert m["n"] == 2910 and m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == 1.0
    assert m["yes_ratio"] == pytest.approx(1500 / 2910)


def test_answer_field_preferred_over_text(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "prompt", "answer": "No"}, ""])
    assert load_answers(path) == [{"question_id": 1, "answer": "No", "row": 1}]


@pytest.fixture
def small_questions(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": i, "image": "x.jpg", "text": "Is there a dog?", "label": lab}
        for i, lab in [(1, "yes"), (2, "no"), (3, "yes")]])


def test_unknown_answer_id(tmp_path, small_questions):
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": "Yes"} for i in (1, 2, 3, 77, 78)])
    with pytest.raises(InputError) as e:
        score_pope(small_questions, answers)
    assert (e.value.file, e.value.row, e.value.field) == (str(answers), 4, "question_id")
    assert "2 answer(s) have a question_id not in" in str(e.value) and "77, 78" in str(e.value)


def test_missing_answer(tmp_path, small_questions):
    answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 2, "text": "No"}])
    with pytest.raises(InputError) as e:
        score_pope(small_questions, answers)
    assert "no answer for 2 of 3 question(s)" in str(e.value) and "question_id 1, 3" in str(e.value)


@pytest.mark.parametrize("rows, row, field, text", [
    (['{"question_id": 1, "image": "x", "text": "t", "label": "yes"}', "{not json"], 2, None, "not valid JSON"),
    ([{"question_id": 1, "image": "x", "text": "t"}], 1, "label", "missing field"),
    ([{"image": "x", "text": "t", "label": "yes"}], 1, "question_id", "missing field"),
    ([{"question_id": 1, "image": "x", "text": "t", "label": "maybe"}], 1, "label", "'maybe'"),
    ([{"question_id": 1, "image": "x", "text": "t", "label": "yes"},
      {"question_id": 1, "image": "x", "text": "t", "label": "no"}], 2, "question_id", "duplicate question_id 1"),
    ([{"question_id": None, "image": "x", "text": "t", "label": "no"}], 1, "question_id", "integer"),
    (["[1, 2]"], 1, None, "expected a JSON object"),
])
def test_load_questions_errors(tmp_path, rows, row, field, text):
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(InputError) as e:
        load_questions(path)
    assert (e.value.file, e.value.row, e.value.field) == (str(path), row, field)
    assert text in str(e.value)


def test_load_errors_files(tmp_path):
    with pytest.raises(InputError, match="cannot read POPE questions file"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="no questions"):
        load_questions(write_jsonl(tmp_path / "empty.jsonl", []))
    bad = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "Yes"}, {"question_id": 2}])
    with pytest.raises(InputError) as e:
        load_answers(bad)
    assert (e.value.row, e.value.field) == (2, "answer")
    dup = write_jsonl(tmp_path / "d.jsonl", [{"question_id": 1, "text": "Yes"}, {"question_id": "1", "text": "No"}])
    with pytest.raises(InputError, match="duplicate question_id '1' \\(first on row 1\\)"):
        load_answers(dup)
    notstr = write_jsonl(tmp_path / "n.jsonl", [{"question_id": 1, "answer": ["Yes"]}])
    with pytest.raises(InputError) as e:
        load_answers(notstr)
    assert e.value.field == "answer"
