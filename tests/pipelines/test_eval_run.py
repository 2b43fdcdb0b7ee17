"""`eval pope` end to end: the tiny LLaVA (base and with a LoRA adapter) answers questions about real photos."""
from __future__ import annotations

import json

import pytest

from actors.errors import InputError
from pipelines.evaluate.pope import parse_pope_answer
from pipelines.evaluate.run_pope import POPE_SUFFIX, eval_pope

PHOTOS = {"astronaut.png": "astronaut", "chelsea.png": "chelsea", "coffee.png": "coffee", "rocket.png": "rocket"}
QUESTIONS = [("astronaut.png", "person", "yes"), ("astronaut.png", "cat", "no"), ("chelsea.png", "cat", "yes"),
             ("chelsea.png", "car", "no"), ("coffee.png", "cup", "yes"), ("coffee.png", "dog", "no"),
             ("rocket.png", "airplane", "no"), ("rocket.png", "cat", "no")]


@pytest.fixture(scope="module")
def pope_set(tmp_path_factory):
    skdata = pytest.importorskip("skimage.data")
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
    assert POPE_SUFFIX == "\nAnswer the question using a single word or phrase."
