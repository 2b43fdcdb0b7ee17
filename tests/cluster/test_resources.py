"""How a pool is scheduled: the keyword arguments `map_batches` gets."""
from __future__ import annotations

import inspect
import warnings

from cluster.resources import (
    ACTOR_TASK_RETRIES,
    PoolConfig,
    map_batches_kwargs,
    map_on_pool,
)


def test_no_runtime_env_when_threads_match_rays_default():
    """Ray gives a worker OMP_NUM_THREADS = floor(num_cpus) (at least 1); a runtime_env only for other thread
    counts, since an actor with one cannot use Ray's prestarted workers and pays a second Python start."""
    assert "runtime_env" not in map_batches_kwargs(PoolConfig(num_cpus=0.9, threads=1))
    assert "runtime_env" not in map_batches_kwargs(PoolConfig(num_cpus=2, threads=2))
    env = map_batches_kwargs(PoolConfig(num_cpus=0.9, threads=2))["runtime_env"]["env_vars"]
    assert env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    kwargs = map_batches_kwargs(PoolConfig(size=2, batch_size=4, num_cpus=0.9, num_gpus=0.5))
    assert (kwargs["batch_size"], kwargs["num_cpus"], kwargs["num_gpus"]) == (4, 0.9, 0.5)


def test_pool_args_are_named_but_the_retry_bound(ray_local):
    """Every pool option but max_task_retries is a named map_batches parameter (the rest of **ray_remote_args is
    deprecated in Ray 2.60); map_on_pool passes it without the warning, and the actors still get Ray Data's
    restart-forever default with our bounded retries."""
    import ray.data
    from ray.data._internal.execution.operators.actor_pool_map_operator import (
        ActorPoolMapOperator,
    )
    from ray.util.annotations import RayDeprecationWarning
    pool = PoolConfig(size=1, max_size=2, num_cpus=0.9, threads=2, num_gpus=0.5, resources={"vram": 1.0},
                      accelerator_type="A100")
    kwargs = map_batches_kwargs(pool)
    named = set(inspect.signature(ray.data.Dataset.map_batches).parameters)
    assert set(kwargs) - named == {"max_task_retries"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        ds = map_on_pool(ray.data.range(4), _Same, kwargs, batch_format="pyarrow")
    remote = ds._logical_plan.dag.ray_remote_args
    assert (remote["num_gpus"], remote["resources"], remote["accelerator_type"]) == (0.5, {"vram": 1.0}, "A100")
    assert remote["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    applied = ActorPoolMapOperator._apply_default_remote_args(remote, ray.data.DataContext.get_current())
    assert (applied["max_restarts"], applied["max_task_retries"]) == (-1, ACTOR_TASK_RETRIES)


class _Same:
    def __call__(self, batch):
        return batch


def test_a_pools_runtime_env_reaches_its_actors_beside_the_thread_env(ray_local):
    """`pools.<name>.runtime_env` is the escape hatch for packages that cannot live beside our pins: it is
    handed to Ray as the actors' runtime_env, merged with the thread variables, and the actors run in it."""
    import ray.data
    pool = PoolConfig(num_cpus=0.9, threads=2, runtime_env={"env_vars": {"SYNTHALIGN_PROBE": "from-pool"}})
    env = map_batches_kwargs(pool)["runtime_env"]
    assert env == {"env_vars": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "SYNTHALIGN_PROBE": "from-pool"}}

    class Env:   # defined here so Ray pickles it by value: the actor's fresh worker cannot import test modules
        def __call__(self, batch):
            import os
            n = batch.num_rows
            return batch.append_column("probe", [[os.environ.get("SYNTHALIGN_PROBE")] * n]).append_column(
                "omp", [[os.environ.get("OMP_NUM_THREADS")] * n])

    out = map_on_pool(ray.data.range(3), Env, map_batches_kwargs(pool), batch_format="pyarrow").take_all()
    assert {(r["probe"], r["omp"]) for r in out} == {("from-pool", "2")}
    assert "runtime_env" not in map_batches_kwargs(PoolConfig(num_cpus=1, threads=1, runtime_env={}))


def test_runtime_env_loads_from_a_config_and_unknown_keys_are_named():
    from pathlib import Path

    from pipelines.config import load_config
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "tiny.yaml", ["pools.images.runtime_env.env_vars.HF_HOME=/models"])
    assert cfg.pools["images"].runtime_env == {"env_vars": {"HF_HOME": "/models"}}
    errs = PoolConfig(runtime_env={"pip": ["vllm"], "pipx": 1}).validate("pools.sampling")
    assert [(e.key, "pipx" in e.message) for e in errs] == [("pools.sampling.runtime_env", True)]

