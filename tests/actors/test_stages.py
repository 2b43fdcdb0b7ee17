"""Each stage class called directly on Arrow batches (no Ray): what it adds and that it is deterministic."""
from __future__ import annotations

import pyarrow as pa
import pytest

from actors.common.objects import COCO_SYNONYMS, ObjectVocab
from actors.common.runtime import open_png, png_bytes
from actors.images import ImagesConfig, ImageSynthesis
from actors.rewards import RewardsConfig, RewardScorer
from actors.sampling import AnswerSampler, SamplerConfig
from actors.select import ImageSelection, SelectionConfig


@pytest.fixture(scope="module")
def synth(tiny_models):
    return ImageSynthesis(ImagesConfig(model=str(tiny_models["sd"]), guidance_scales=[3.0, 7.0],
                                       per_scale=2, steps=2, height=64, width=64))


def test_image_synthesis_k_candidates_deterministic_per_prompt(synth):
    t = pa.table({"prompt_id": ["p1", "p2"], "image_prompt": ["a red car", "a dog"]})
    out = synth(t).to_pylist()
    assert len(out[0]["candidate_images"]) == 4
    assert out[0]["candidate_guidance"] == [3.0, 3.0, 7.0, 7.0]
    assert len(set(out[0]["candidate_images"])) == 4  # distinct seeds give distinct images
    alone = synth(pa.table({"prompt_id": ["p2"], "image_prompt": ["a dog"]})).to_pylist()[0]
    assert alone["candidate_images"] == out[1]["candidate_images"]  # batching does not matter
    assert open_png(out[0]["candidate_images"][0]).size == (64, 64)


TRUNCATION_CHILD = """
import sys
import pyarrow as pa
from actors.images import ImagesConfig, ImageSynthesis
synth = ImageSynthesis(ImagesConfig(model=sys.argv[1], guidance_scales=[3.0, 7.0], per_scale=1, steps=1,
                                    height=64, width=64))
long = " ".join(["a red car beside a green bicycle"] * 20)   # far over CLIP's 77 tokens
for i in range(3):                                            # 3 batches x 2 prompts x 2 candidates
    out = synth(pa.table({"prompt_id": [f"p{i}", f"q{i}"], "image_prompt": [f"{long} {i}", f"{i} {long}"]}))
    assert len(out.column("candidate_images")[0]) == 2
print("rendered")
"""


def test_prompt_truncation_warning_is_printed_once_per_process(tiny_models):
    # In a child process: "once per process" cannot be seen in one that other tests already warned in.
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", TRUNCATION_CHILD, str(tiny_models["sd"])], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "rendered" in r.stdout, r.stderr[-3000:]
    assert r.stderr.count("The following part of your input was truncated") == 1, r.stderr[-3000:]


def test_selection_keeps_the_best_scored_candidate(tiny_models, synth):
    t = synth(pa.table({"prompt_id": ["p1"], "image_prompt": ["a red car"]}))
    sel = ImageSelection(SelectionConfig(model=str(tiny_models["clip"])))
    row = sel(t).to_pylist()[0]
    assert "candidate_images" not in row
    scores = row["candidate_scores"]
    best = scores.index(max(scores))
    assert row["image"] == t.column("candidate_images").to_pylist()[0][best]
    assert row["seed"] == row["candidate_seeds"][best] and row["image_score"] == max(scores)


def _image_rows(n=2):
    from PIL import Image
    img = png_bytes(Image.new("RGB", (40, 40), "red"))
    return pa.table({"image": pa.array([img] * n, pa.binary()), "question": ["What is this?"] * n,
                     "pair_key": [f"k{i}" for i in range(n)]})


def test_sampler_appends_n_answers_per_model_and_is_seeded(tiny_models):
    a = AnswerSampler(SamplerConfig(model=str(tiny_models["llava"]), name="A", n=2, temperature=1.0,
                                    max_new_tokens=6))
    b = AnswerSampler(SamplerConfig(model=str(tiny_models["llava-b"]), name="B", n=1, max_new_tokens=6))
    out = b(a(_image_rows())).to_pylist()
    assert [len(r["answers"]) for r in out] == [3, 3]
    assert out[0]["answer_models"] == ["A", "A", "B"]
    again = a(_image_rows()).to_pylist()
    assert [r["answers"] for r in again] == [r["answers"][:2] for r in out]
    assert out[0]["answers"][:2] != out[1]["answers"][:2]  # per-row seeds differ


def test_reward_scorer_terms_and_hallucination_penalty(tiny_models):
    vocab = ObjectVocab.from_file(COCO_SYNONYMS)
    scorer = RewardScorer(RewardsConfig(text_model=str(tiny_models["reward"]),
                                        clip_model=str(tiny_models["clip"])), vocab)
    t = _image_rows(1).append_column("answers", pa.array([["a dog and a cat", "a dog", "two hot dogs"]]))
    t = t.append_column("gt_objects", pa.array([["dog"]], pa.list_(pa.string())))
    row = scorer(t).to_pylist()[0]
    assert row["hallucinated"] == [["cat"], [], ["hot dog"]]
    assert row["reward_hallucination"] == [-1.0, 0.0, -1.0]
    assert len(row["reward_text"]) == len(row["reward_clip"]) == len(row["reward"]) == 3
    assert len(set(row["reward_text"])) == 3
    assert sum(row["reward"]) == pytest.approx(0.0, abs=1e-9)  # sums of z-scores


def test_make_tiny_is_idempotent(tiny_models):
    from pipelines.models.tiny import make_tiny
    marker = tiny_models["llava"] / ".complete"
    before = marker.stat().st_mtime_ns
    assert make_tiny(tiny_models["llava"].parent, names=["llava"])["llava"] == tiny_models["llava"]
    assert marker.stat().st_mtime_ns == before


def test_tiny_models_load_through_the_hub_code_paths(tiny_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"])
    proc = AutoProcessor.from_pretrained(tiny_models["llava"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 300_000
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                     {"type": "text", "text": "hi"}]}],
                                      add_generation_prompt=True)
    assert "<image>" in prompt
    from PIL import Image
    enc = proc(images=[Image.new("RGB", (32, 32))], text=[prompt], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 16
