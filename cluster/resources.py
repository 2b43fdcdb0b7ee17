"""How a stage is scheduled, kept apart from what it does: pool size, CPUs/GPUs, node resources.

Every actor pool and the training worker group take their Ray resources from here, so a config
moves a stage to another node group (a custom resource such as `sampling_node`) without code changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from actors.common.errors import Problem

# The runtime_env fields Ray 2.60 documents (ray.runtime_env.RuntimeEnv).
RUNTIME_ENV_KEYS = frozenset({"pip", "uv", "conda", "env_vars", "working_dir", "py_modules", "excludes",
                              "image_uri", "container", "py_executable", "nsight", "config", "worker_process_setup_hook"})


@dataclass
class PoolConfig:
    size: int = 1                     # actors in the pool (min size when max_size is set)
    max_size: int | None = None       # autoscale the pool between size and max_size
    batch_size: int = 4               # rows per call
    num_cpus: float = 1.0             # CPUs Ray reserves for each actor
    num_gpus: float = 0.0             # fractions share a GPU between actors
    accelerator_type: str | None = None  # e.g. "A100" (ray.util.accelerators names)
    resources: dict[str, float] = field(default_factory=dict)  # custom node resources
    threads: int = 1                  # torch threads inside each actor
    # Ray's per-actor environment (pip/uv/conda/env_vars/...): the escape hatch when a pool's packages (a newer
    # vLLM) cannot live beside the project's pins.
    runtime_env: dict[str, Any] = field(default_factory=dict)

    def validate(self, name: str) -> list[Problem]:
        errs = []
        unknown = sorted(set(self.runtime_env) - RUNTIME_ENV_KEYS)
        if unknown:
            errs.append(Problem(f"{name}.runtime_env", f"unknown key(s) {unknown}; Ray takes "
                                                       f"{sorted(RUNTIME_ENV_KEYS)}"))
        if self.size < 1:
            errs.append(Problem(f"{name}.size", "must be >= 1"))
        if self.max_size is not None and self.max_size < self.size:
            errs.append(Problem(f"{name}.max_size", "must be >= size"))
        if self.batch_size < 1:
            errs.append(Problem(f"{name}.batch_size", "must be >= 1"))
        if self.num_cpus < 0 or self.num_gpus < 0:
            errs.append(Problem(f"{name}", "num_cpus and num_gpus must be >= 0"))
        if self.threads < 1:
            errs.append(Problem(f"{name}.threads", "must be >= 1"))
        return errs


@dataclass
class WorkersConfig:
    """The Ray Train worker group."""
    num_workers: int = 2              # training processes (data-parallel ranks)
    use_gpu: bool = False             # one GPU per worker unless num_gpus says otherwise
    num_cpus: float = 1.0             # CPUs Ray reserves for each worker
    num_gpus: float = 0.0             # GPUs per worker (with use_gpu)
    accelerator_type: str | None = None  # e.g. "A100" (ray.util.accelerators names)
    resources: dict[str, float] = field(default_factory=dict)  # custom node resources each worker needs
    threads: int = 1                  # torch threads inside each worker

    def validate(self, name: str) -> list[Problem]:
        errs = []
        if self.num_workers < 1:
            errs.append(Problem(f"{name}.num_workers", "must be >= 1"))
        if self.threads < 1:
            errs.append(Problem(f"{name}.threads", "must be >= 1"))
        return errs


@dataclass
class ClusterShape:
    """The cluster a config is meant for (`cluster:` in a run config). When given, pools that can never all be
    placed at once are an error at load: Ray Data starts every pool of the chain together, and a pool that finds
    no room waits forever."""
    nodes: int = 1                    # nodes of this shape
    gpus_per_node: float = 0.0        # GPUs each node offers
    resources: dict[str, float] = field(default_factory=dict)   # custom resources each node offers

    def placement_problems(self, pools: dict[str, PoolConfig]) -> list[Problem]:
        """`pools`: the pools that run at once, by name (a sampler's own pool as sampling:<name>)."""
        errs = []
        want = {name: p.size * p.num_gpus for name, p in pools.items() if p.num_gpus}
        total, have = sum(want.values()), self.nodes * self.gpus_per_node
        if total > have:
            parts = " + ".join(f"{name} {g:g}" for name, g in want.items())
            errs.append(Problem("pools", f"ask for {total:g} GPUs at once ({parts}) but the cluster has {have:g} "
                                         f"({self.nodes} node(s) x {self.gpus_per_node:g})"))
        for name, p in pools.items():
            if p.num_gpus > max(1.0, self.gpus_per_node):
                errs.append(Problem(f"pools.{name}.num_gpus", f"{p.num_gpus:g} per actor: no node has that many"))
            missing = sorted(set(p.resources) - set(self.resources))
            if missing:
                errs.append(Problem(f"pools.{name}.resources", f"no node offers {', '.join(missing)} "
                                                               f"(cluster.resources: {sorted(self.resources)})"))
        return errs


def _thread_env(threads: int, num_cpus: float, runtime_env: dict | None = None) -> dict:
    """A runtime_env only when `threads` differs from Ray's own OMP_NUM_THREADS (floor of num_cpus, at least 1)
    or the pool names one: an actor with a runtime_env cannot take one of Ray's prestarted workers and starts a
    fresh one through setup_worker.py, a second Python start (about 1 CPU-s per actor, more under load)."""
    env = {k: v for k, v in (runtime_env or {}).items() if k != "env_vars"}
    env_vars = dict((runtime_env or {}).get("env_vars") or {})
    if threads != max(1, math.floor(num_cpus)):
        env_vars = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **env_vars}
    if env_vars:
        env["env_vars"] = env_vars
    return {"runtime_env": env} if env else {}


# A batch whose actor died is retried on the restarted actor this many times (5: Ray Data's own default before
# it became -1, forever): a batch that kills its actor every time (a device-side assert on one input) would
# otherwise loop without end. Ray 2.60 takes it only through map_batches' **ray_remote_args, deprecated for
# removal in 2.64 with no named replacement (DataContext and ActorPoolStrategy have none either): map_on_pool
# silences that one warning; on 2.64 the call fails with a TypeError, not silently.
ACTOR_TASK_RETRIES = 5


def map_batches_kwargs(pool: PoolConfig) -> dict:
    """Keyword arguments for `Dataset.map_batches` running a callable class on an actor pool.

    Ray Data restarts crashed pool actors (its default max_restarts=-1) and retries their batches,
    ACTOR_TASK_RETRIES times here; a batch that raises is not retried (the row guard quarantines bad rows and
    ends the actor on a fatal error, see actors/common/guard.py). All but max_task_retries are named parameters
    of map_batches; call it through map_on_pool.
    """
    import ray.data
    compute = (ray.data.ActorPoolStrategy(min_size=pool.size, max_size=pool.max_size) if pool.max_size
               else ray.data.ActorPoolStrategy(size=pool.size))
    kwargs = {"compute": compute, "batch_size": pool.batch_size, "num_cpus": pool.num_cpus,
              **_thread_env(pool.threads, pool.num_cpus, pool.runtime_env), "max_task_retries": ACTOR_TASK_RETRIES}
    if pool.num_gpus:
        kwargs["num_gpus"] = pool.num_gpus
    if pool.resources:
        kwargs["resources"] = dict(pool.resources)
    if pool.accelerator_type:
        kwargs["accelerator_type"] = pool.accelerator_type
    return kwargs


def map_on_pool(ds, fn, kwargs: dict, **more):
    """`ds.map_batches(fn, **kwargs, **more)` with `kwargs` from map_batches_kwargs, without Ray's warning that
    `ray_remote_args` (here only max_task_retries, see ACTOR_TASK_RETRIES) is deprecated."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        return ds.map_batches(fn, **kwargs, **more)


# Shard writes are small I/O. At Ray's default of a whole CPU, the write waited for the actor pools to release
# theirs (measured: pools holding 1.75 of 2 CPUs wrote no shard until the stream ended: no resume, no streaming).
WRITE_CPUS = 0.05


def task_kwargs(num_cpus: float = 1.0) -> dict:
    """Keyword arguments for cheap stateless `map_batches` steps (plain Ray tasks)."""
    return {"num_cpus": num_cpus}


def scaling_config(w: WorkersConfig):
    from ray.train import ScalingConfig
    per_worker: dict = {"CPU": w.num_cpus, **w.resources}
    if w.use_gpu:
        per_worker["GPU"] = w.num_gpus or 1.0
    return ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu, resources_per_worker=per_worker,
                         accelerator_type=w.accelerator_type)
