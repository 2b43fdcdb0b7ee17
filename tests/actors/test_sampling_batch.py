"""Batched sampling (no Ray): many rows per `generate` call, each row's samples decided by its own seeds.

Guaranteed: a row's random draws come from generators seeded by (seed, pair_key, model, j) only, so, given
the same image and question, its answers are the same whatever micro-batch size or companions (the batched
logits agree up to float rounding; on the tiny models the answers are identical, checked here).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from actors.common.runtime import png_bytes
from actors.sampling import (
    AnswerSampler,
    PerRowSampling,
    SamplerConfig,
    TransformersBackend,
)

QUESTIONS = ["Describe the image.", "What is in the picture?", "Is there a dog in the image?",
             "How many cars are there in this photo of a street?", "What colour is the bus?"]


def images(n):
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (48, 48, 3), dtype=np.uint8)) for i in range(n)]


def cfg(tiny_models, **kw):
    return SamplerConfig(model=str(tiny_models["llava"]), name="A", n=2, temperature=1.0, max_new_tokens=10, **kw)


@pytest.fixture(scope="module")
def rows():
    n = 9
    return images(n), [QUESTIONS[i % len(QUESTIONS)] for i in range(n)], [f"p{i}-q0" for i in range(n)]


@pytest.fixture(scope="module")
def by_batch_size(tiny_models, rows):
    return {b: TransformersBackend(cfg(tiny_models, batch_size=b), threads=1).answer(*rows) for b in (1, 4, 9)}


def test_same_answers_whatever_the_micro_batch_size(by_batch_size):
    one = by_batch_size[1]
    assert by_batch_size[4] == one and by_batch_size[9] == one
    assert all(len(a) == 2 for a in one)
    assert len({a for row in one for a in row}) == 18  # every row and sample its own draws


def test_rows_answer_the_same_in_any_company(tiny_models, rows, by_batch_size):
    """What the stage sees when Ray (or a resume) groups rows differently: other companions, other order."""
    ims, qs, keys = rows
    be = TransformersBackend(cfg(tiny_models, batch_size=4), threads=1)
    order = [7, 2, 5, 0]
    got = be.answer([ims[i] for i in order], [qs[i] for i in order], [keys[i] for i in order])
    assert got == [by_batch_size[1][i] for i in order]
    other_key = be.answer(ims[:1], qs[:1], ["another-key"])
    assert other_key != by_batch_size[1][:1]  # the key is the seed


def test_one_generate_call_per_micro_batch(tiny_models, rows, monkeypatch):
    ims, qs, keys = rows
    be = TransformersBackend(cfg(tiny_models, batch_size=4), threads=1)
    sizes, generate = [], be.model.generate

    def spy(**kw):
        sizes.append(kw["input_ids"].shape[0])
        return generate(**kw)
    monkeypatch.setattr(be.model, "generate", spy)
    be.answer(ims, qs, keys)
    assert sizes == [8, 8, 2]  # 4 + 4 + 1 rows, n=2 sequences each


def test_stage_batches_and_appends(tiny_models, rows, by_batch_size):
    ims, qs, keys = rows
    t = pa.table({"image": pa.array([png_bytes(im) for im in ims], pa.binary()), "question": qs, "pair_key": keys})
    sampler = AnswerSampler(cfg(tiny_models, batch_size=4))
    whole = sampler(t).to_pylist()
    parts = sampler(t.slice(0, 5)).to_pylist() + sampler(t.slice(5)).to_pylist()
    assert [r["answers"] for r in whole] == [r["answers"] for r in parts]
    assert all(r["answer_models"] == ["A", "A"] for r in whole)


def test_per_row_sampling_draws_from_each_rows_own_generator():
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    batch = PerRowSampling([11, 12, 13], temperature=1.0)(None, scores.clone())
    assert batch.shape == scores.shape
    picks = batch.argmax(-1)
    assert torch.isfinite(batch).sum(-1).tolist() == [1, 1, 1]  # greedy decoding can only take the pick
    for i, seed in enumerate((11, 12, 13)):
        alone = PerRowSampling([seed], temperature=1.0)(None, scores[i:i + 1].clone()).argmax(-1)
        assert alone.item() == picks[i].item()
    many = [PerRowSampling([s], temperature=1.0)(None, scores[:1].clone()).argmax(-1).item() for s in range(40)]
    assert len(set(many)) > 5  # it samples
    tight = [PerRowSampling([s], temperature=1.0, top_p=1e-6)(None, scores[:1].clone()).argmax(-1).item()
             for s in range(10)]
    assert set(tight) == {scores[0].argmax().item()}  # top-p keeps only the most likely token
    cold = [PerRowSampling([s], temperature=1e-4)(None, scores[:1].clone()).argmax(-1).item() for s in range(10)]
    assert set(cold) == {scores[0].argmax().item()}


def test_greedy_needs_no_keys_and_is_batched(tiny_models, rows):
    ims, qs, _ = rows
    greedy = [TransformersBackend(SamplerConfig(model=str(tiny_models["llava"]), max_new_tokens=6, batch_size=b),
                                  threads=1).answer(ims, qs) for b in (1, 9)]
    assert greedy[0] == greedy[1] and all(len(a) == 1 for a in greedy[0])
    with pytest.raises(ValueError, match="key"):
        TransformersBackend(cfg(tiny_models), threads=1).answer(ims[:1], qs[:1])


def test_batch_size_is_validated():
    assert [p.key for p in SamplerConfig(model="m", batch_size=0).validate("samplers[0]")] == ["samplers[0].batch_size"]
