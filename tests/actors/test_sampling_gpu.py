"""The vLLM backend behind the same column contract as transformers (GPU nodes with the `vllm` extra)."""
from __future__ import annotations

import shutil

import pyarrow as pa
import pytest
from PIL import Image

from actors.common.runtime import png_bytes
from actors.sampling import AnswerSampler, SamplerConfig
from pipelines.models.tiny import to_hub_layout


@pytest.mark.gpu
def test_vllm_backend_answers_with_the_same_columns(tiny_models, tmp_path):
    pytest.importorskip("vllm")
    model = shutil.copytree(tiny_models["llava"], tmp_path / "llava")
    to_hub_layout(model)   # vision weight names vLLM's LLaVA loader maps (tests/actors/test_sampling_vllm.py on CPU)
    cfg = SamplerConfig(model=str(model), name="v", backend="vllm", n=2, temperature=1.0,
                        max_new_tokens=8, max_model_len=512, dtype="float16")
    img = png_bytes(Image.new("RGB", (32, 32), "red"))
    batch = pa.table({"image": pa.array([img, img], pa.binary()), "question": ["What is this?"] * 2,
                      "pair_key": ["k0", "k1"], "prompt_id": ["p0", "p1"]})
    out = AnswerSampler(cfg)(batch).to_pylist()
    assert [len(r["answers"]) for r in out] == [2, 2]
    assert out[0]["answer_models"] == ["v", "v"] and out[0]["error"] is None
    again = AnswerSampler(cfg)(batch).to_pylist()
    assert [r["answers"] for r in again] == [r["answers"] for r in out]  # per-row seeds
