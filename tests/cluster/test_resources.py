"""How a pool is scheduled: the keyword arguments `map_batches` gets (no Ray needed)."""
from __future__ import annotations

from cluster.resources import PoolConfig, map_batches_kwargs


def test_no_runtime_env_when_threads_match_rays_default():
    """Ray gives a worker OMP_NUM_THREADS = floor(num_cpus) (at least 1); a runtime_env only for other thread
    counts, since an actor with one cannot use Ray's prestarted workers and pays a second Python start."""
    assert "runtime_env" not in map_batches_kwargs(PoolConfig(num_cpus=0.9, threads=1))
    assert "runtime_env" not in map_batches_kwargs(PoolConfig(num_cpus=2, threads=2))
    env = map_batches_kwargs(PoolConfig(num_cpus=0.9, threads=2))["runtime_env"]["env_vars"]
    assert env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    kwargs = map_batches_kwargs(PoolConfig(size=2, batch_size=4, num_cpus=0.9, num_gpus=0.5))
    assert (kwargs["batch_size"], kwargs["num_cpus"], kwargs["num_gpus"], kwargs["max_restarts"]) == (4, 0.9, 0.5, -1)
