"""The VLM judge (actors/common/judge.py): P(yes) per (image, object), as image scorer and as reward term."""
from __future__ import annotations

import pyarrow as pa
import pytest
from PIL import Image

from actors.common.judge import Judge
from actors.common.runtime import png_bytes
from actors.rewards import RewardsConfig, RewardScorer
from actors.select import ImageSelection, SelectionConfig

COLOURS = [(250, 0, 0), (0, 200, 0), (0, 0, 150), (120, 120, 0)]


@pytest.fixture(scope="module")
def judge(tiny_models):
    return Judge(str(tiny_models["llava"]))


def images(n=4):
    return [Image.new("RGB", (48, 48), c) for c in COLOURS[:n]]


def test_p_yes_is_a_probability_per_object_deterministic_and_batch_free(judge):
    objs = [["dog", "red circle"], [], ["dining table"], ["cat", "person", "hot dog"]]
    got = judge.p_yes(images(), objs)
    assert [len(r) for r in got] == [2, 0, 1, 3]
    assert all(0.0 < p < 1.0 for r in got for p in r)
    assert judge.p_yes(images(), objs) == got
    alone = [judge.p_yes([im], [o])[0] for im, o in zip(images(), objs)]
    flat = [p for r in got for p in r]
    assert [p for r in alone for p in r] == pytest.approx(flat, abs=1e-5)
    assert len(set(flat)) > 1   # the image and the question both reach the logits
    assert judge.p_yes([], []) == []


def test_the_judge_loads_in_the_requested_dtype(tiny_models):
    import torch
    half = Judge(str(tiny_models["llava"]), dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    got = half.p_yes(images(2), [["dog"], ["cat", "person"]])
    assert [len(r) for r in got] == [1, 2] and all(0 < p < 1 for r in got for p in r)


def test_yes_and_no_are_read_from_the_tokens_that_tell_them_apart(judge):
    # The tiny BPE writes " Yes" as "Ġ" "Y" "es": the bare space starts both answers and is no evidence.
    tok = judge.processor.tokenizer
    assert [tok.decode([t]).strip() for t in judge.yes] == ["y"]
    assert [tok.decode([t]).strip() for t in judge.no] == ["n"]


def test_the_answer_token_is_the_one_written_after_the_prompt():
    from actors.common.judge import answer_token
    from pipelines.models.tiny import build_tokenizer
    tok = build_tokenizer(corpus=["USER: ASSISTANT: Yes No yes no", "assistant\nYes\nNo"] * 20)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    # After "ASSISTANT:" the answer is written with its space (LLaVA-1.5); after a newline (ChatML) without.
    assert answer_token(tok, "USER: hi ASSISTANT:", "Yes") == ids(" Yes")[0] != ids("Yes")[0]
    assert answer_token(tok, "<|im_start|>assistant\n", "No") == ids("No")[0] != ids(" No")[0]
    assert len(ids(" Yes")) == len(ids("No")) == 1
    # The shapes LLaVA's BPE knows " no" but writes " yes" as "Ġ" "y" "e" "s": a bare space is no "yes".
    shapes_like = build_tokenizer(corpus=["USER: ASSISTANT: Yes No no"] * 20)
    assert shapes_like.convert_ids_to_tokens(shapes_like(" yes", add_special_tokens=False)["input_ids"])[0] == "Ġ"
    assert answer_token(shapes_like, "USER: hi ASSISTANT:", "yes") is None
    assert answer_token(shapes_like, "USER: hi ASSISTANT:", "no") is not None


def test_a_llava_next_judge_reads_images_of_any_shape_batch_free(tmp_path):
    """LLaVA-1.6's any-res tiling gives each image its own count of image tokens: rows pad differently."""
    import numpy as np

    from pipelines.models.twins import llava_next
    llava_next(tmp_path, 11, "mistral")
    judge = Judge(str(tmp_path))
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 64), (64, 64)]]
    objs = [["dog", "red circle"], ["cat"]]
    got = judge.p_yes(imgs, objs)
    assert [len(r) for r in got] == [2, 1] and all(0 < p < 1 for r in got for p in r)
    alone = [judge.p_yes([im], [o])[0] for im, o in zip(imgs, objs)]
    assert [p for r in alone for p in r] == pytest.approx([p for r in got for p in r], abs=1e-5)


def test_the_judge_asks_as_the_samplers_and_the_shapes_pretraining_do(judge):
    from actors.common.judge import chat_prompt
    from actors.common.shapes import existence_question
    from actors.sampling import chat_prompt as sampler_prompt
    assert Judge.question("red circle") == existence_question("red circle")
    q = Judge.question("dog")
    assert chat_prompt(judge.processor, q) == sampler_prompt(judge.processor, q)


def fake_p_yes(self, imgs, objects_per_image):
    """P(yes) = the image's red share for "dog", its green share for anything else."""
    out = []
    for im, objs in zip(imgs, objects_per_image):
        r, g, _ = im.getpixel((0, 0))
        out.append([r / 255 if o == "dog" else g / 255 for o in objs])
    return out


def candidates_table():
    cands = [png_bytes(im) for im in images()]
    return pa.table({"prompt_id": ["p1", "p2"], "image_prompt": ["a dog and a cat", "a wall"],
                     "gt_objects": pa.array([["dog", "cat"], []], pa.list_(pa.string())),
                     "candidate_images": pa.array([cands, cands[:2]], pa.list_(pa.binary())),
                     "candidate_seeds": [[1, 2, 3, 4], [5, 6]],
                     "candidate_guidance": [[5.0, 5.0, 7.0, 7.0], [5.0, 7.0]]})


def test_judge_scorer_keeps_the_candidate_with_the_highest_mean_p_yes(tiny_models, monkeypatch):
    monkeypatch.setattr(Judge, "p_yes", fake_p_yes)
    sel = ImageSelection(SelectionConfig(scorer="judge", model=str(tiny_models["llava"])))
    t = candidates_table()
    rows = sel(t).to_pylist()
    # means of (red, green): (250/255 + 0)/2, (0 + 200/255)/2, 0, 120/255: the first wins
    assert rows[0]["candidate_judge"] == [[250 / 255, 0.0], [0.0, 200 / 255], [0.0, 0.0], [120 / 255, 120 / 255]]
    assert rows[0]["candidate_scores"] == pytest.approx([125 / 255, 100 / 255, 0.0, 120 / 255])
    assert rows[0]["image"] == t.column("candidate_images").to_pylist()[0][0] and rows[0]["seed"] == 1
    assert rows[0]["image_score"] == pytest.approx(125 / 255)
    # A prompt naming no object: nothing to ask, every candidate scores 0 and the first is kept.
    assert rows[1]["candidate_judge"] == [[], []] and rows[1]["candidate_scores"] == [0.0, 0.0]
    assert rows[1]["seed"] == 5


def test_judge_scorer_on_the_tiny_llava_adds_one_verdict_per_prompt_object(tiny_models):
    sel = ImageSelection(SelectionConfig(scorer="judge", model=str(tiny_models["llava"])))
    out = sel(candidates_table())
    assert set(ImageSelection.JUDGE_ADDS) | set(ImageSelection.ADDS) <= set(out.column_names)
    assert out.schema.field("candidate_judge").type == pa.list_(pa.list_(pa.float64()))
    rows = out.to_pylist()
    assert [[len(v) for v in r["candidate_judge"]] for r in rows] == [[2, 2, 2, 2], [0, 0]]
    means = [sum(v) / len(v) for v in rows[0]["candidate_judge"]]
    assert rows[0]["candidate_scores"] == pytest.approx(means)
    assert rows[0]["image_score"] == pytest.approx(max(means))
    assert "candidate_judge" not in ImageSelection(SelectionConfig(scorer="none"))(candidates_table()).column_names


def answers_table():
    return pa.table({"image": pa.array([png_bytes(images(1)[0])] * 2, pa.binary()),
                     "question": ["Describe this image.", "Is there a dog in the image?"],
                     "answers": [["a dog and a cat", "a dog", "a cat next to a person"], ["Yes", "No, there is none"]],
                     "gt_objects": pa.array([["dog", "cat"], ["dog"]], pa.list_(pa.string()))})


def test_judge_reward_is_minus_the_refuted_claims(tiny_models, coco_vocab, monkeypatch):
    asked = []

    def p_yes(self, imgs, objects_per_image):
        asked.append(objects_per_image)
        table = {"dog": 0.9, "cat": 0.2, "person": 0.4}   # cat and person refuted (< 0.5)
        return [[table[o] for o in objs] for objs in objects_per_image]

    monkeypatch.setattr(Judge, "p_yes", p_yes)
    scorer = RewardScorer(RewardsConfig(judge_model=str(tiny_models["llava"]), weights={"judge": 1.0}), coco_vocab)
    rows = scorer(answers_table()).to_pylist()
    assert asked == [[["dog", "cat", "person"], ["dog"]]]   # one batch; each object once per image
    assert rows[0]["judge_claims"] == [["dog", "cat"], ["dog"], ["cat", "person"]]
    assert rows[0]["judge_p_yes"] == [[0.9, 0.2], [0.9], [0.2, 0.4]]
    assert rows[0]["reward_judge"] == [-1.0, 0.0, -2.0]
    assert rows[0]["reward"][1] > rows[0]["reward"][0] > rows[0]["reward"][2]   # judge is the only term on
    # "No" to an existence question claims nothing: no verdict, no penalty.
    assert rows[1]["judge_claims"] == [["dog"], []] and rows[1]["judge_p_yes"] == [[0.9], []]
    assert rows[1]["reward_judge"] == [0.0, 0.0]


def test_judge_reward_on_the_tiny_llava_has_one_verdict_per_claim(tiny_models, coco_vocab):
    scorer = RewardScorer(RewardsConfig(judge_model=str(tiny_models["llava"]), weights={"judge": 1.0}), coco_vocab)
    out = scorer(answers_table())
    assert out.schema.field("judge_p_yes").type == pa.list_(pa.list_(pa.float64()))
    for r in out.to_pylist():
        assert [len(c) for c in r["judge_claims"]] == [len(p) for p in r["judge_p_yes"]]
        assert all(0 < p < 1 for ps in r["judge_p_yes"] for p in ps)
        assert r["reward_judge"] == [-float(sum(p < 0.5 for p in ps)) for ps in r["judge_p_yes"]]


def test_without_a_judge_the_term_is_zero_and_no_verdicts_are_added(coco_vocab):
    out = RewardScorer(RewardsConfig(), coco_vocab)(answers_table())
    assert not set(RewardScorer.JUDGE_ADDS) & set(out.column_names)
    assert out.column("reward_judge").to_pylist() == [[0.0] * 3, [0.0] * 2]


def test_a_judge_weight_without_a_judge_model_is_one_problem_naming_the_key():
    problems = RewardsConfig(weights={"judge": 1.0}).validate()
    assert [p.key for p in problems] == ["rewards.judge_model"]
    assert RewardsConfig(judge_model="m", weights={"judge": 1.0}).validate() == []
    assert SelectionConfig(scorer="judge", model="m").validate() == []
    assert [p.key for p in SelectionConfig(scorer="judge").validate()] == ["selection.model"]


def test_a_config_without_a_judge_hashes_as_before_it_and_one_with_it_differs():
    from conftest import ROOT

    from pipelines.config import load_config
    base = load_config(ROOT / "configs" / "tiny.yaml")
    assert "judge_model" not in base.data_dict()["rewards"]
    judged = load_config(ROOT / "configs" / "tiny.yaml", ["rewards.judge_model=some/vlm"])
    assert judged.data_dict()["rewards"]["judge_model"] == "some/vlm" and judged.hash() != base.hash()
