"""The generation chain: every wiring built from the one stage list, `actors.contract.STAGES`.

From it come the column-contract check, the per-stage Ray Data chain, the fused chain (`fuse: true`) and the
cluster simulation's chain (stand-ins swapped in by pool key).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

from actors.common.guard import FAULTS_ENV
from actors.common.metrics import held
from actors.contract import PROMPT_COLUMNS, STAGES, check_chain
from cluster.resources import PoolConfig, map_batches_kwargs, map_on_pool
from cluster.storage import Location
from pipelines.layout import RunLayout


@dataclass
class Step:
    """One stage instance of a concrete run: what to construct, and on which pool."""
    name: str                          # the stage class name: what the dashboard shows per pool
    pool: PoolConfig
    parts: list                        # [(class, constructor kwargs, takes threads)]

    @property
    def classes(self) -> list[type]:
        return [cls for cls, _, _ in self.parts]


def steps(cfg, vocab, stages=STAGES, swap: dict | None = None) -> list[Step]:
    """The run's stage instances in order; `swap` replaces stage classes by pool key (same constructor)."""
    out = []
    for st in stages:
        cls = (swap or {}).get(st.pool, st.cls)
        section = getattr(cfg, st.config)
        for sub in section if isinstance(section, list) else [section]:
            kwargs = {"cfg": sub, **({"vocab": vocab} if st.needs_vocab else {})}
            parts = [(cls, kwargs, True)]
            if st.then:
                parts.append((st.then, st.then_kwargs(cfg), False))
            pool = cfg.pool(st.pool, sub if isinstance(section, list) else None)
            out.append(Step(cls.__name__, pool, parts))
    return out


def check_steps(run_steps: list[Step]) -> list[str]:
    """The column contract of the chain that will run; returns the columns it ends with."""
    return check_chain(PROMPT_COLUMNS, [c for s in run_steps for c in s.classes])


class Chain:
    """Stage instances run one after another in one actor. A cheap row-wise step rides with the stage before
    it: a separate task per batch costs a hop through the object store and, on a busy node, often a fresh
    worker process (about 1 s of CPU each; docs/results.md). With `fuse: true` the whole chain is one actor: on
    CPU nodes one process per core beats a process per stage time-sharing the cores."""

    def __init__(self, parts, threads: int = 1, startup_dir: str | None = None):
        t0, loads, self.parts = time.time(), {}, []
        for cls, kwargs, takes_threads in parts:
            t = time.time()
            self.parts.append(cls(**kwargs, **({"threads": threads} if takes_threads else {})))
            label = getattr(kwargs.get("cfg"), "label", None)   # a sampler per model
            loads[f"{cls.__name__}:{label}" if label else cls.__name__] = round(time.time() - t, 3)
        if startup_dir:
            record_startup(Location(startup_dir), type(self).__name__, t0, loads)

    def __call__(self, batch):
        # A batch retried after a later part failed re-runs the earlier ones: metrics count the call that returned.
        with held():
            for part in self.parts:
                batch = part(batch)
        return batch


def record_startup(folder: Location, name: str, t0: float, loads: dict) -> None:
    """One JSON file per actor: when its process started, when its constructor began and ended, and each stage's
    load seconds, in the run folder (a folder every node sees, or object storage); best effort: a missing
    record costs a figure, never the run."""
    try:
        import psutil
        me = psutil.Process()
        started, cpu = me.create_time(), sum(me.cpu_times()[:2])   # CPU-s of the process's start and loads
    except Exception:
        started = cpu = None
    try:
        (folder / f"{name}-{os.getpid()}.json").write_text(json.dumps(
            {"actor": name, "process_start": started, "init_start": t0, "ready": time.time(), "loads": loads,
             "cpu_at_ready": cpu}))
    except (OSError, TypeError):
        pass


def named_chain(name: str) -> type:
    """A Chain subclass named after its stage, so the dashboard shows MapWorker(MapBatches(ImageSynthesis))."""
    return type(name, (Chain,), {"__module__": __name__, "__qualname__": name})


def call_rows(cfg) -> int:
    """Rows that fill whole diffusers calls: ImageSynthesis renders `per_scale` slots a row in calls of exactly
    `images.batch_size` (a short call is padded with copies), one call per guidance scale (the shapes backend
    draws one image a call)."""
    im = cfg.images
    if im.backend == "shapes":
        return 1
    return im.batch_size // math.gcd(im.batch_size, im.per_scale)


def images_batch_rows(cfg) -> int:
    """Rows per images actor call: `pools.images.batch_size` rounded up to whole diffusers calls, so no call but
    the stream's last is padded (a padded slot costs a full render on the bottleneck stage)."""
    unit = call_rows(cfg)
    return -(-cfg.pool("images").batch_size // unit) * unit


def rows_per_block(cfg, n_prompts: int) -> int:
    """Prompts per Ray Data block, at most ~1,000 blocks for the driver to track, always a whole number of images
    batches (`images_batch_rows`): only the last block can end in a partial diffusers call. Per-stage pools get
    one images batch per block, so every later pool is fed from the first rows on (`plan` predicts with that
    flow). The fused chain is one pool: 1 to 8 batches, about 8 blocks per actor (a balanced finish). Each block
    costs a prompt-rows task, a shard write, an actor call and the driver's bookkeeping: on the CPU chain blocks
    of one batch spent ~2x the CPU of blocks of four outside the actors, and eight instead of four took 2-4% less
    CPU and wall at 2,048 prompts (docs/results.md)."""
    batch = images_batch_rows(cfg)
    size = max(-(-n_prompts // 1000), batch)
    if cfg.fuse:
        size = max(-(-n_prompts // 1000), min(8 * batch, -(-n_prompts // (8 * cfg.pool("images").size))))
    return max(batch, -(-size // batch) * batch)


def build_pipeline(cfg, prompts, vocab, stages=STAGES, swap: dict | None = None, startup_dir: str | None = None):
    """Chain the stages on a Ray Data dataset of prompt rows (a run's: source.PromptSource.dataset; or a small
    pyarrow table, cut into blocks here); the contract is checked first. With `startup_dir`, every actor records
    its start and model-load times there (`record_startup`)."""
    import pyarrow as pa
    import ray.data
    run_steps = steps(cfg, vocab, stages, swap)
    check_steps(run_steps)
    ds = prompts
    if isinstance(prompts, pa.Table):
        size = rows_per_block(cfg, prompts.num_rows)
        ds = ray.data.from_arrow([prompts.slice(i, size) for i in range(0, prompts.num_rows, size)])
    if cfg.fuse:  # one actor class, scheduled by pools.images
        run_steps = [Step("WholeChain", cfg.pool("images"), [p for s in run_steps for p in s.parts])]
    for i, step in enumerate(run_steps):
        kwargs = map_batches_kwargs(step.pool)
        if i == 0 and stages[0].pool == "images":   # alone or heading the fused chain: whole diffusers calls
            kwargs["batch_size"] = images_batch_rows(cfg)
        if cfg.faults and cfg.faults.stage:  # test-only fault injection travels as an env var
            kwargs.setdefault("runtime_env", {}).setdefault("env_vars", {})[FAULTS_ENV] = json.dumps(
                {**dataclasses.asdict(cfg.faults),
                 "marker_dir": cfg.faults.marker_dir or str(RunLayout(cfg.output_dir).faults)})
        ds = map_on_pool(ds, named_chain(step.name), kwargs, batch_format="pyarrow",
                         fn_constructor_kwargs={"parts": step.parts, "threads": step.pool.threads,
                                                "startup_dir": startup_dir})
    return ds


def prompt_table(rows: list[dict]):
    import pyarrow as pa
    return pa.table({
        "prompt_id": pa.array([r["prompt_id"] for r in rows], pa.string()),
        "image_prompt": pa.array([r["image_prompt"] for r in rows], pa.string()),
        "instructions": pa.array([r["instructions"] for r in rows], pa.list_(pa.string())),
        "gt_objects": pa.array([r["gt_objects"] for r in rows], pa.list_(pa.string())),
    })
