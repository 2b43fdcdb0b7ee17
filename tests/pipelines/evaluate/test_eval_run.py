"""`eval pope` end to end: the tiny LLaVA (base and with a LoRA adapter) answers questions about real photos."""
from __future__ import annotations

import json

import pytest

from actors.common.errors import InputError
from pipelines.evaluate.answer import POPE_SUFFIX, eval_pope
from pipelines.evaluate.pope import parse_pope_answer

PHOTOS = {"astronaut.png": "astronaut", "chelsea.png": "chelsea", "coffee.png": "coffee", "rocket.png": "rocket"}
QUESTIONS = [("astronaut.png", "person", "yes"), ("astronaut.png", "cat", "no"), ("chelsea.png", "cat", "yes"),
             ("chelsea.png", "car", "no"), ("coffee.png", "cup", "yes"), ("coffee.png", "dog", "no"),
             ("rocket.png", "airplane", "no"), ("rocket.png", "cat", "no")]


@pytest.fixture(scope="module")
def pope_set(tmp_path_factory):
    import skimage.data as skdata  # the [test] extra requires scikit-image
    from PIL import Image
    root = tmp_path_factory.mktemp("pope")
    (root / "images").mkdir()
    for name, fn in PHOTOS.items():
        Image.fromarray(getattr(skdata, fn)()).convert("RGB").save(root / "images" / name)
    with open(root / "questions.jsonl", "w") as f:
        for i, (img, obj, label) in enumerate(QUESTIONS, 1):
            f.write(json.dumps({"question_id": i, "image": img, "text": f"Is there a {obj} in the image?",
                                "label": label}) + "\n")
    return root


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"])
    # init_lora_weights=False: random B, so the adapter really changes the answers
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return out


def read_answers(path):
    return [json.loads(line) for line in open(path)]


def test_eval_pope_base_and_adapter(pope_set, tiny_models, adapter, ray_local, tmp_path):
    base = eval_pope(pope_set / "questions.jsonl", pope_set / "images", str(tiny_models["llava"]),
                     out_dir=tmp_path / "base")
    tuned = eval_pope(pope_set / "questions.jsonl", pope_set / "images", str(tiny_models["llava"]),
                      adapter=str(adapter), out_dir=tmp_path / "adapter")
    for result, folder in ((base, "base"), (tuned, "adapter")):
        answers = read_answers(tmp_path / folder / "answers.jsonl")
        assert [a["question_id"] for a in answers] == list(range(1, len(QUESTIONS) + 1))
        assert result["n"] == len(QUESTIONS) and result["unanswered"] == 0
        assert all(0.0 <= result[k] <= 1.0 for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
        preds = [parse_pope_answer(a["text"]) for a in answers]
        assert result["yes_ratio"] == pytest.approx(preds.count("yes") / len(preds))
        labels = [q[2] for q in QUESTIONS]
        assert result["accuracy"] == pytest.approx(sum(p == g for p, g in zip(preds, labels)) / len(preds))
        assert json.loads((tmp_path / folder / "metrics.json").read_text())["n"] == len(QUESTIONS)
    base_texts = [a["text"] for a in read_answers(tmp_path / "base" / "answers.jsonl")]
    tuned_texts = [a["text"] for a in read_answers(tmp_path / "adapter" / "answers.jsonl")]
    assert base_texts != tuned_texts  # the adapter was applied


def test_missing_images_are_named(pope_set, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "chelsea.png").write_bytes((pope_set / "images" / "chelsea.png").read_bytes())
    with pytest.raises(InputError, match=r"3 image\(s\) .* missing, first: astronaut.png"):
        eval_pope(pope_set / "questions.jsonl", tmp_path / "imgs", "unused")
    with pytest.raises(InputError, match="image folder not found"):
        eval_pope(pope_set / "questions.jsonl", tmp_path / "nope", "unused")


def test_llava15_suffix():
    # A published fact: LLaVA-1.5's POPE prompt (model_vqa_loader), which its reported numbers depend on.
    assert POPE_SUFFIX == "\nAnswer the question using a single word or phrase."


# ---- controlled POPE on generated images ---------------------------------------------------------------------
# A small "run": gt_objects as the prompts stage writes them (synonyms allowed); p0 appears twice, as a run's
# pairs hold one row per question about the same image.
RUN_ROWS = [("p0", ["cat", "dog"]), ("p0", ["cat", "dog"]), ("p1", ["kitten", "dog", "sofa"]),
            ("p2", ["dog", "frisbee"]), ("p3", ["car", "person"]), ("p4", ["man", "bicycle"]), ("p5", ["cat"])]


@pytest.fixture(scope="module")
def run_rows():
    from PIL import Image

    from actors.common.runtime import png_bytes
    return [{"prompt_id": pid, "gt_objects": gt, "image": png_bytes(Image.new("RGB", (8, 8), (i * 30, 0, 0)))}
            for i, (pid, gt) in enumerate(RUN_ROWS)]


def by_image(questions):
    out = {}
    for q in questions:
        out.setdefault(q["prompt_id"], []).append(q)
    return out


@pytest.mark.parametrize("strategy", ["random", "popular", "adversarial"])
def test_controlled_pope_balanced_and_grounded(run_rows, coco_vocab, strategy):
    from pipelines.evaluate.pope import controlled_pope_questions
    qs = controlled_pope_questions(run_rows, coco_vocab, n_neg=2, strategy=strategy, seed=0)
    assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
    assert all(q["text"] == f"Is there a {q['object']} in the image?" for q in qs)
    assert all(q["object"] in coco_vocab.classes for q in qs)
    groups = by_image(qs)
    assert sorted(groups) == ["p0", "p1", "p2", "p3", "p4", "p5"]        # p0 counted once
    for pid, rows in groups.items():
        gt = {coco_vocab.canonical(o) for p, objs in RUN_ROWS if p == pid for o in objs}
        yes = [q["object"] for q in rows if q["label"] == "yes"]
        no = [q["object"] for q in rows if q["label"] == "no"]
        assert len(yes) == len(no) == min(2, len(gt))                    # balanced per image
        assert set(yes) <= gt and not set(no) & gt                        # negatives really absent
        assert {q["image"] for q in rows} == {f"{pid}.png"}
    assert qs == controlled_pope_questions(run_rows, coco_vocab, n_neg=2, strategy=strategy, seed=0)


def test_controlled_pope_popular_and_adversarial_negatives(run_rows, coco_vocab):
    from pipelines.evaluate.pope import controlled_pope_questions
    negatives = {s: {pid: [q["object"] for q in rows if q["label"] == "no"]
                     for pid, rows in by_image(controlled_pope_questions(run_rows, coco_vocab, 2, s)).items()}
                 for s in ("popular", "adversarial")}
    # Frequencies over images: cat 3, dog 3, person 2, the rest 1 or 0.
    assert negatives["popular"]["p5"] == ["dog"] and sorted(negatives["popular"]["p3"]) == ["cat", "dog"]
    # Co-occurrence with the image's objects: dog is seen with cat twice, couch once; person with bicycle once.
    assert negatives["adversarial"]["p5"] == ["dog"]
    assert negatives["adversarial"]["p2"] == ["cat", "couch"]
    assert negatives["adversarial"]["p3"][0] == "bicycle"
    cooc = {}
    for gt in ({"cat", "dog"}, {"cat", "dog", "couch"}, {"dog", "frisbee"}, {"car", "person"},
               {"person", "bicycle"}, {"cat"}):
        for a in gt:
            for b in gt - {a}:
                cooc[a, b] = cooc.get((a, b), 0) + 1
    for pid, objs in (("p0", {"cat", "dog"}), ("p5", {"cat"}), ("p2", {"dog", "frisbee"})):
        for neg in negatives["adversarial"][pid]:
            assert any(cooc.get((g, neg), 0) > 0 for g in objs)          # co-occurs with a present object


def test_controlled_pope_files_feed_eval(run_rows, coco_vocab, tmp_path):
    from pipelines.evaluate.answer import check_images
    from pipelines.evaluate.pope import (
        controlled_pope_questions,
        load_questions,
        write_pope_set,
    )
    qs = controlled_pope_questions(run_rows, coco_vocab, n_neg=3, strategy="random", seed=1)
    qfile, images = write_pope_set(run_rows, qs, tmp_path)
    loaded = load_questions(qfile)
    assert [q["question_id"] for q in loaded] == [q["question_id"] for q in qs]
    assert sum(q["label"] == "yes" for q in loaded) == sum(q["label"] == "no" for q in loaded)
    check_images(loaded, images)                                          # every named image was written
    assert len(list(images.iterdir())) == 6


def test_controlled_pope_bad_input(run_rows, coco_vocab):
    from pipelines.evaluate.pope import controlled_pope_questions
    with pytest.raises(InputError, match=r"row 2, field 'gt_objects': unknown object 'unicorn'"):
        controlled_pope_questions([run_rows[0], {**run_rows[1], "gt_objects": ["unicorn"]}], coco_vocab)
    with pytest.raises(InputError, match="strategy must be one of"):
        controlled_pope_questions(run_rows, coco_vocab, strategy="hard")
