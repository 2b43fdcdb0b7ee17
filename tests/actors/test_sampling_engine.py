"""vLLM engine options in the sampler config: what fits a model to the GPUs at hand (the engine itself needs a
GPU, or the CPU lane: tests/actors/test_sampling_vllm.py)."""
from __future__ import annotations

import pytest
from conftest import ROOT

from actors.sampling import SamplerConfig, engine_kwargs
from pipelines.config import load_config


def test_engine_options_reach_the_vllm_engine():
    cfg = SamplerConfig(model="m", backend="vllm", tensor_parallel_size=2, gpu_memory_utilization=0.45,
                        quantization="awq", max_num_seqs=64, max_model_len=2048, seed=3, enforce_eager=True)
    kw = engine_kwargs(cfg)
    assert (kw["tensor_parallel_size"], kw["gpu_memory_utilization"], kw["quantization"], kw["max_num_seqs"],
            kw["max_model_len"], kw["seed"], kw["enforce_eager"]) == (2, 0.45, "awq", 64, 2048, 3, True)
    default = engine_kwargs(SamplerConfig(model="m", backend="vllm"))
    assert "quantization" not in default and "enforce_eager" not in default   # vLLM's own defaults


@pytest.mark.parametrize("field,value", [("tensor_parallel_size", 0), ("gpu_memory_utilization", 1.5),
                                         ("gpu_memory_utilization", 0.0), ("max_num_seqs", 0)])
def test_bad_engine_options_are_named(field, value):
    assert [p.key for p in SamplerConfig(model="m", **{field: value}).validate("samplers[0]")] == \
        [f"samplers[0].{field}"]


def test_an_engine_must_fit_its_pools_share_of_a_gpu():
    cfg = load_config(ROOT / "configs" / "paper-1node.yaml")
    assert all(s.gpu_memory_utilization <= cfg.pool("sampling", s).num_gpus for s in cfg.samplers)
    cfg.samplers[1].gpu_memory_utilization = 0.9
    assert [p.key for p in cfg.validate()] == ["samplers[1].gpu_memory_utilization"]
