"""A vLLM sampler's tensor_parallel_size must match the GPUs its pool gives each actor: a one-line config error at
load, naming the sampler and the pool."""
from __future__ import annotations

import pytest

from actors.common.errors import InputError
from pipelines.config import load_config
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"


def samplers(tp: int, backend: str = "vllm") -> str:
    return (f"samplers=[{{model: m, name: big, backend: {backend}, tensor_parallel_size: {tp}}}, "
            "{model: m2, name: small, backend: vllm, gpu_memory_utilization: 0.4}]")


@pytest.mark.parametrize("sets,pool,gpus", [
    ([samplers(2), "pools.sampling.num_gpus=1"], "pools.sampling", "1"),
    ([samplers(4), "pools.sampling.num_gpus=1", "pools.sampling:big.num_gpus=2"], "pools.sampling:big", "2"),
    ([samplers(2), "pools.sampling.num_gpus=0.5"], "pools.sampling", "0.5"),
])
def test_tensor_parallel_size_not_matching_the_pool_fails_at_load(sets, pool, gpus):
    with pytest.raises(InputError) as e:
        load_config(TINY, sets)
    msg = str(e.value)
    assert "\n" not in msg and "samplers[0].tensor_parallel_size" in msg and "sampler 'big' shards" in msg
    assert f"{pool} gives each actor num_gpus {gpus}" in msg


def test_a_single_gpu_engine_on_several_gpus_fails_at_load():
    with pytest.raises(InputError, match=r"samplers\[1\].tensor_parallel_size'?: sampler 'small' shards its vLLM "
                                         r"engine over 1 GPU\(s\), but its pool pools.sampling gives each actor "
                                         r"num_gpus 2"):
        load_config(TINY, [samplers(2), "pools.sampling.num_gpus=2", "pools.sampling:big.num_gpus=2"])


@pytest.mark.parametrize("sets", [
    [samplers(2), "pools.sampling.num_gpus=1", "pools.sampling:big.num_gpus=2"],    # a GPU per TP rank
    [samplers(2), "pools.sampling.num_gpus=0.5", "pools.sampling:big.num_gpus=2"],  # its own pool
    [samplers(2, backend="transformers"), "pools.sampling.num_gpus=1"],             # no engine to shard
])
def test_consistent_pools_load(sets):
    cfg = load_config(TINY, sets)
    assert cfg.samplers[0].tensor_parallel_size == 2


def test_shipped_vllm_configs_are_consistent():
    for name in ("paper", "paper-1node", "pairs-2k", "pairs-9k"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert all(s.pool_problems("s", cfg.pools) == [] for s in cfg.samplers if s.backend == "vllm"), name
