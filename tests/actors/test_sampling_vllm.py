"""The vLLM backend on CPU (the `vllm` lane: `.ci/vllm-lane` runs these in a venv with `vllm-cpu`; skipped where
vLLM is not importable, as the project venv is). One engine serves every test of the module."""
from __future__ import annotations

import os

import pyarrow as pa
import pytest
from PIL import Image

from actors.common.runtime import png_bytes
from actors.sampling import AnswerSampler, SamplerConfig

# On this CPU machine: the engine in this process (no engine-core subprocess to start) and a 1 GiB KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

QUESTIONS = ["What is this?", "Is there a red object in the image?", "Describe the picture."]


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def sampler(request, tmp_path_factory):
    """The tiny LLaVA-1.5 (the policy) and a LLaVA-NeXT twin (the paper's samplers): text head size 32, vllm-cpu's
    least; saved with the hub's weight names."""
    from pipelines.models.tiny import make_tiny, to_hub_layout
    from pipelines.models.twins import llava_next
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        model = make_tiny(folder, names=["llava"])["llava"]
    else:
        model = folder / "model"
        model.mkdir()
        llava_next(model, 11, "mistral")
    to_hub_layout(model)
    cfg = SamplerConfig(model=str(model), name="v", backend="vllm", n=3, temperature=1.0, max_new_tokens=6,
                        max_model_len=256, dtype="float32", max_num_seqs=8, enforce_eager=True)
    sampler = AnswerSampler(cfg)
    yield sampler
    del sampler.backend.llm   # one engine at a time


def images():
    # Different shapes: LLaVA-NeXT's any-res cuts each into 32 px tiles by its own aspect (80x48: a 2x2 grid).
    return [Image.new("RGB", size, c) for size, c in (((32, 32), "red"), ((64, 32), "green"), ((80, 48), "blue"))]


def test_answers_fill_the_columns_n_per_row(sampler):
    batch = pa.table({"image": pa.array([png_bytes(im) for im in images()], pa.binary()), "question": QUESTIONS,
                      "pair_key": ["k0", "k1", "k2"], "prompt_id": ["p0", "p1", "p2"]})
    out = sampler(batch).to_pylist()
    assert [len(r["answers"]) for r in out] == [3, 3, 3]
    assert all(r["answer_models"] == ["v"] * 3 and r["error"] is None for r in out)
    assert all(isinstance(a, str) and a for r in out for a in r["answers"])
    assert len({a for r in out for a in r["answers"]}) > 1   # sampled, not one greedy answer repeated


def test_a_rows_answers_depend_on_its_key_alone(sampler):
    backend = sampler.backend
    first = backend.answer(images(), QUESTIONS, ["k0", "k1", "k2"])
    assert backend.answer(images(), QUESTIONS, ["k0", "k1", "k2"]) == first          # same seeds, same answers
    assert backend.answer(images()[1:2], QUESTIONS[1:2], ["k1"]) == first[1:2]       # alone or in a batch
    reordered = backend.answer(images()[::-1], QUESTIONS[::-1], ["k2", "k1", "k0"])
    assert reordered == first[::-1]
    assert backend.answer(images()[:1], QUESTIONS[:1], ["other"]) != first[:1]      # another key, other draws


def test_max_new_tokens_bounds_each_answer(sampler):
    backend = sampler.backend
    tok = backend.processor.tokenizer
    one_token = {tok.decode([i], skip_special_tokens=True).strip() for i in range(len(tok))}
    short = backend.answer(images(), QUESTIONS, ["k0", "k1", "k2"], max_new_tokens=1)
    long = backend.answer(images(), QUESTIONS, ["k0", "k1", "k2"], max_new_tokens=12)
    assert all(a in one_token for row in short for a in row)     # exactly what one token decodes to
    # Re-encoding is no token count (a lone byte token decodes to U+FFFD); the same seeded draws cut sooner are.
    assert all(lg.startswith(s) for s_row, l_row in zip(short, long) for s, lg in zip(s_row, l_row))
    assert sum(a not in one_token for row in long for a in row) > 0
    longest = max(len(t) for t in one_token)
    assert all(len(a) <= 6 * longest for row in backend.answer(images(), QUESTIONS, ["k0", "k1", "k2"]) for a in row)
