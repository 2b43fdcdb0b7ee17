"""Batched image synthesis (no Ray): `images.batch_size` images per diffusers call, and what it guarantees.

Guaranteed: an image's bytes depend on the config and its row only, not on which rows arrive together (Ray's
batching, the rows a resume redoes). A different `images.batch_size` gives the same seeds and the same
pixels up to float rounding.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from actors.common.runtime import open_png
from actors.images import ImagesConfig, ImageSynthesis

PROMPTS = {"p1": "a red car", "p2": "a dog on a sofa beside a lamp", "p3": "two cats", "p4": "a bus in a street",
           "p5": "a bowl of apples and a knife on a wooden table"}


def table(ids):
    return pa.table({"prompt_id": list(ids), "image_prompt": [PROMPTS[i] for i in ids]})


def synth_for(tiny_models, batch_size):
    return ImageSynthesis(ImagesConfig(model=str(tiny_models["sd"]), guidance_scales=[3.0, 7.0], per_scale=2,
                                       steps=2, height=64, width=64, batch_size=batch_size))


@pytest.fixture(scope="module")
def synth4(tiny_models):
    return synth_for(tiny_models, 4)


@pytest.fixture(scope="module")
def all_rows(synth4):
    return {r["prompt_id"]: r for r in synth4(table(PROMPTS)).to_pylist()}


def test_every_call_renders_batch_size_images_at_one_guidance_scale(synth4, monkeypatch):
    calls = []
    pipe = synth4.pipe

    def spy(**kw):
        calls.append((len(kw["prompt"]), len(kw["generator"]), kw["guidance_scale"]))
        return pipe(**kw)
    monkeypatch.setattr(synth4, "pipe", spy)
    out = synth4(table(["p1", "p2", "p3", "p4", "p5"])).to_pylist()
    # 5 rows x 2 candidates per scale = 10 images per scale -> 3 calls of 4 (the last padded) per scale, the
    # scales in turn for each group of 4 slots
    assert calls == [(4, 4, 3.0), (4, 4, 7.0)] * 3
    assert [len(r["candidate_images"]) for r in out] == [4] * 5
    assert all(r["candidate_guidance"] == [3.0, 3.0, 7.0, 7.0] for r in out)


def test_bytes_do_not_depend_on_which_rows_arrive_together(synth4, all_rows):
    """As after a resume, or with other pool batch sizes: other companions, other positions, alone."""
    for ids in (["p3"], ["p4", "p2"], ["p5", "p1", "p3"]):
        for r in synth4(table(ids)).to_pylist():
            assert r["candidate_images"] == all_rows[r["prompt_id"]]["candidate_images"], (ids, r["prompt_id"])
            assert r["candidate_seeds"] == all_rows[r["prompt_id"]]["candidate_seeds"]
    images = [b for r in all_rows.values() for b in r["candidate_images"]]
    assert len(set(images)) == len(images)  # every candidate its own seed: no two alike


def count_encodes(synth, monkeypatch) -> list:
    """Calls that reach the pipeline's own encode_prompt (under the LastPromptEncoding wrapper)."""
    wrapper, calls = synth.pipe.encode_prompt, []
    real = wrapper.encode

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(wrapper, "encode", spy)
    return calls


def test_prompts_encoded_once_per_slot_group_and_images_bitwise_unchanged(synth4, all_rows, monkeypatch):
    """Reusing the prompt encoding across guidance scales changes no byte against encoding in every call."""
    from actors.images import LastPromptEncoding
    assert isinstance(synth4.pipe.encode_prompt, LastPromptEncoding)
    calls = count_encodes(synth4, monkeypatch)
    synth4(table(PROMPTS))
    assert len(calls) == 3   # 3 groups of 4 slots, 2 guidance scales each: 6 diffusers calls, 3 encodings
    monkeypatch.setattr(synth4.pipe, "encode_prompt", synth4.pipe.encode_prompt.encode)   # encode every call
    again = {r["prompt_id"]: r for r in synth4(table(PROMPTS)).to_pylist()}
    assert all(again[pid]["candidate_images"] == row["candidate_images"] for pid, row in all_rows.items())


def test_sd3_twin_encodes_once_per_group_and_same_bytes(twin_models, monkeypatch):
    """The paper's image model class (StableDiffusion3Pipeline: two CLIP encoders and T5)."""
    synth = ImageSynthesis(ImagesConfig(model=str(twin_models["sd3"]), guidance_scales=[5.0, 7.0, 9.0], steps=2,
                                        height=64, width=64, batch_size=2))
    calls = count_encodes(synth, monkeypatch)
    rows = table(["p1", "p2", "p3"])
    first = synth(rows).column("candidate_images").to_pylist()
    assert len(calls) == 2   # 3 rows in 2 groups of 2, 3 scales each: 6 calls, 2 encodings
    monkeypatch.setattr(synth.pipe, "encode_prompt", synth.pipe.encode_prompt.encode)
    assert synth(rows).column("candidate_images").to_pylist() == first


def test_prompt_encoding_cache_keys():
    from actors.images import LastPromptEncoding
    seen = []
    enc = LastPromptEncoding(lambda *a, **k: seen.append((a, k)) or len(seen))
    assert enc(["a", "b"], "cpu", 1, True, None, clip_skip=None) == 1
    assert enc(["a", "b"], "cpu", 1, True, None, clip_skip=None) == 1   # same arguments: reused
    assert enc(["a", "b"], "cpu", 1, False, None, clip_skip=None) == 2  # guidance off: encoded anew
    assert enc(["a", "c"], "cpu", 1, False, None, clip_skip=None) == 3
    tensor = object()   # not plain data (as a tensor of precomputed embeddings): never cached
    assert enc(["a", "c"], "cpu", 1, False, None, prompt_embeds=tensor) == 4
    assert enc(["a", "c"], "cpu", 1, False, None, prompt_embeds=tensor) == 5


def test_other_batch_size_same_seeds_and_pixels_up_to_rounding(tiny_models, all_rows):
    other = {r["prompt_id"]: r for r in synth_for(tiny_models, 1)(table(PROMPTS)).to_pylist()}
    worst = 0
    for pid, row in all_rows.items():
        assert other[pid]["candidate_seeds"] == row["candidate_seeds"]
        assert other[pid]["candidate_guidance"] == row["candidate_guidance"]
        for a, b in zip(other[pid]["candidate_images"], row["candidate_images"]):
            diff = np.abs(np.asarray(open_png(a), int) - np.asarray(open_png(b), int))
            worst = max(worst, int(diff.max()))
            assert diff.mean() < 0.05  # a few pixels off by a level, not another image
    assert worst <= 2


def test_shapes_backend_same_images_whatever_batch_size():
    from actors.common import shapes
    rows = pa.table({"prompt_id": ["s1", "s2"], "image_prompt": [shapes.make_prompt(0, i)["image_prompt"]
                                                                  for i in (1, 2)]})
    a, b = (ImageSynthesis(ImagesConfig(backend="shapes", guidance_scales=[1.0], per_scale=2, height=32, width=32,
                                        batch_size=bs))(rows) for bs in (4, 1))
    assert a.column("candidate_images").to_pylist() == b.column("candidate_images").to_pylist()
    assert open_png(a.column("candidate_images").to_pylist()[0][0]).size == (32, 32)


def test_batch_size_is_validated():
    assert any(p.key == "images" for p in ImagesConfig(model="m", batch_size=0).validate())
