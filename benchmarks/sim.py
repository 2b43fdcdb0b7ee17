"""The cluster simulation of `python -m benchmarks`: a multi-node cluster with declared GPUs
(`ray.cluster_utils.Cluster`, in a subprocess of its own) runs the real Ray Data chain of `build_pipeline`
with sleep stand-ins for the GPU stages, sized and costed by `synthalign plan` (pipelines/plan.py: public A100
figures). It measures each pool's busy fraction between its first and last item and Ray's idle time between one
actor's batches, and checks the plan's predicted stream time against the simulated one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

from actors.contract import STAGES
from benchmarks.child import REPO, run_child

SIM_ENV = "SYNTHALIGN_SIM"


class _SimStage:
    """Sleep stand-in for a GPU stage: same constructor and columns as the real class; logs its busy spans.
    A subclass names the stage it stands for (`KEY`, a pool key of actors.contract.STAGES) and takes that
    stage's column contract from the real class, never a copy."""
    KEY = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        real = next(st.cls for st in STAGES if st.pool == cls.KEY)
        cls.REAL = real
        cls.REQUIRES, cls.ADDS = real.REQUIRES, real.ADDS
        cls.DROPS = getattr(real, "DROPS", ())

    def __init__(self, cfg, threads: int = 1, vocab=None):
        spec = json.loads(os.environ[SIM_ENV])
        self.cfg, self.key = cfg, getattr(cfg, "pool_key", None) or self.KEY   # a sampler: sampling:<name>
        self.per_item, self.log = spec["per_item"][self.key], Path(spec["log_dir"])
        self.image_bytes = spec["image_bytes"]

    def __call__(self, batch):
        t0, (batch, items) = time.time(), self.fill(batch)
        time.sleep(max(0.0, self.per_item * items - (time.time() - t0)))   # the batch takes its modelled time
        with open(self.log / f"{self.key.replace(':', '_')}-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"t0": t0, "t1": time.time(), "items": items}) + "\n")
        return batch


def _add(table, **cols):
    from actors.common.runtime import add_node_tag, with_columns
    return with_columns(add_node_tag(table, cols.pop("_stage")), cols)


class SimImages(_SimStage):
    KEY = "images"

    def fill(self, batch):
        import pyarrow as pa
        k, n = self.cfg.num_candidates, batch.num_rows
        imgs = [[os.urandom(self.image_bytes) for _ in range(k)] for _ in range(n)]
        return _add(batch, _stage="images", candidate_images=pa.array(imgs, pa.list_(pa.binary())),
                    candidate_seeds=[list(range(k))] * n,
                    candidate_guidance=[[float(g) for g in self.cfg.guidance_scales for _ in range(
                        self.cfg.per_scale)]] * n), n * k


class SimSelection(_SimStage):
    KEY = "selection"

    def fill(self, batch):
        import pyarrow as pa
        cands = batch.column("candidate_images").to_pylist()
        return _add(batch.drop_columns([c for c in self.DROPS if c in batch.column_names]), _stage="selection",
                    image=pa.array([c[0] for c in cands], pa.binary()), image_score=[1.0] * len(cands),
                    seed=[0] * len(cands), guidance_scale=[5.0] * len(cands),
                    candidate_scores=[[1.0] * len(c) for c in cands]), sum(map(len, cands))


class SimSampler(_SimStage):
    KEY = "sampling"   # one per sampler: its pool key comes from its config (sampling:<name>)

    def fill(self, batch):
        n, keys = self.cfg.n, batch.column("pair_key").to_pylist()
        prev = batch.column("answers").to_pylist() if "answers" in batch.column_names else [[]] * len(keys)
        models = batch.column("answer_models").to_pylist() if "answers" in batch.column_names else [[]] * len(keys)
        return _add(batch, _stage=self.key, answers=[p + [f"{self.key} {j} {k}" for j in range(n)]
                                                      for p, k in zip(prev, keys)],
                    answer_models=[m + [self.cfg.label] * n for m in models]), n * len(keys)


class SimRewards(_SimStage):
    KEY = "rewards"

    def fill(self, batch):
        answers = batch.column("answers").to_pylist()
        score = [[float(len(a) % 7 + j) for j, a in enumerate(row)] for row in answers]
        zero = [[0.0] * len(row) for row in answers]
        terms = {c: zero for c in self.ADDS if c.startswith("reward_")}
        return _add(batch, _stage="rewards", **{**terms, "reward_text": score, "reward": score},
                    hallucinated=[[[] for _ in row] for row in answers]), sum(map(len, answers))


SIM_STAGES = {cls.KEY: cls for cls in (SimImages, SimSelection, SimSampler, SimRewards)}


def sim_plan(cfg, gpus: int = 8, nodes: int = 1, shape: dict | None = None):
    """The plan the simulation runs: `synthalign plan`'s for `nodes` x `gpus`, or a given shape (GPUs per pool;
    `sampling` for every sampler without its own), split into actors the same way."""
    from pipelines.plan import Plan, default_costs, items_per_prompt, make_plan, split
    if not shape:
        return make_plan(cfg, gpus, nodes)
    rows, samplers = items_per_prompt(cfg), {s.pool_key: s for s in cfg.samplers}
    want = {k: float(shape.get(k, shape.get("sampling", 1.0) if k.startswith("sampling:") else 1.0)) for k in rows}
    pools = {}
    for k, g in want.items():
        size, share = split(g)
        pools[k] = dataclasses.replace(cfg.pool(k.split(":")[0], samplers.get(k)), size=size, num_gpus=share,
                                       max_size=None, resources={})
    gpus = math.ceil(sum(want.values())) + 1        # +1: room to pack the fractions
    return Plan("", 1, gpus, cfg.prompts.num_prompts, default_costs(cfg), [], rows,
                {k: round(p.size * p.num_gpus, 3) for k, p in pools.items()}, pools)


def _gaps(spans: list[dict]) -> list[float]:
    """Idle time between one actor's consecutive batches (spans are logged per process)."""
    out = []
    for pid_spans in spans:
        s = sorted(pid_spans, key=lambda x: x["t0"])
        out += [b["t0"] - a["t1"] for a, b in zip(s, s[1:])]
    return out


def cluster_child(a: dict) -> dict:
    """Own Ray: a head and `nodes` GPU nodes, then the real chain on stand-ins sized by the plan."""
    import statistics
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    from actors.prompts import load_prompts
    from actors.rewards import load_vocab
    from cluster.connect import connect
    from pipelines.config import load_config
    from pipelines.generate.chain import build_pipeline, prompt_table
    from pipelines.generate.job import write_scored
    work = Path(a["out"])
    shutil.rmtree(work, ignore_errors=True)
    (work / "log").mkdir(parents=True)
    cfg = load_config(REPO / "configs" / a["config"], [f"output_dir={work / 'run'}",
                                                       f"prompts.num_prompts={a['prompts']}", "fuse=false"])
    plan = sim_plan(cfg, int(a["gpus"]), a.get("nodes", 1), a["shape"])
    pools = {k: dataclasses.replace(p, num_cpus=0.25) for k, p in plan.pools.items()}  # 2 real cores host it all
    per_item = {k: plan.costs[k] * a["scale"] / p.num_gpus for k, p in pools.items()}
    cfg.pools = pools
    os.environ[SIM_ENV] = json.dumps({"per_item": per_item, "log_dir": str(work / "log"),
                                      "image_bytes": a["image_bytes"]})  # raylets and their workers inherit it
    common = {"object_store_memory": 200 * 1024 ** 2}  # (127.0.0.1 would not do: ray.init maps it to the host IP)
    # A private temp dir: a plain `ray.init()` elsewhere on this machine must not join this cluster.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sa-sim-", dir="/tmp")  # short: socket path limits
    c = Cluster(initialize_head=True, head_node_args={**common, "num_cpus": 2, "include_dashboard": False})
    try:
        for _ in range(plan.nodes):
            c.add_node(**common, num_cpus=8, num_gpus=plan.gpus_per_node)
        c.wait_for_nodes()
        connect(c.address)
        # Each pool's actors all start before its first batch: else the first actor up takes work while the
        # others still start (~1 s apart on 2 busy cores), and that spread (~18% of the diffusion pool's window at
        # 600 prompts) would count as idle. Startup is measured apart (`synthalign generate`'s timings).
        import ray.data
        ray.data.DataContext.get_current().wait_for_min_actors_s = 600
        rows = load_prompts(cfg.prompts)
        t0 = time.time()
        write_scored(build_pipeline(cfg, prompt_table(rows), load_vocab(cfg.rewards, cfg.prompts.source),
                                    swap=SIM_STAGES),
                     work / "run" / "scored", cfg.rows_per_shard)
        wall = time.time() - t0
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    spans: dict[str, list] = {}
    for f in (work / "log").glob("*.jsonl"):
        spans.setdefault(f.stem.rsplit("-", 1)[0], []).append([json.loads(ln) for ln in f.read_text().splitlines()])
    report, scale = {}, a["scale"]
    # Ray's per-batch overhead on this host: the median idle time between one actor's batches in the lead pool,
    # which always has input waiting (elsewhere idle time also holds waits for input, by design)
    gaps = _gaps(spans.get(plan.lead.replace(":", "_"), []))
    overhead = statistics.median(gaps) if gaps else 0.0
    for key, p in pools.items():
        s = [x for actor in spans.get(key.replace(":", "_"), []) for x in actor]
        first, last = min(x["t0"] for x in s), max(x["t1"] for x in s)
        busy = sum(x["t1"] - x["t0"] for x in s)
        capacity = p.size * (last - first)
        report[key] = {"gpus": plan.gpus[key], "actors": p.size, "a100_s_per_item": round(plan.costs[key], 4),
                       "batches": len(s), "busy": round(busy / capacity, 3),
                       "busy_net": round(min(1.0, (busy + len(s) * overhead) / capacity), 3),
                       "batch_s": round(busy / len(s), 3), "window_s": round(last - first, 2),
                       "first": first, "last": last}
    start, end = min(r["first"] for r in report.values()), max(r["last"] for r in report.values())
    # Steady state: every pool has started (the chain is full) until the lead pool's last item (then the others
    # drain). Balance shows here; the first->last figure adds the fill and drain of a short run.
    full, lead_end = max(r["first"] for r in report.values()), report[plan.lead]["last"]
    for key, p in pools.items():
        inside = sum(max(0.0, min(x["t1"], lead_end) - max(x["t0"], full))
                     for actor in spans.get(key.replace(":", "_"), []) for x in actor)
        report[key]["busy_steady"] = round(inside / (p.size * (lead_end - full)), 3) if lead_end > full else None
    img = report[plan.lead] if plan.lead in report else report["images"]
    per_prompt_s = img["window_s"] / a["prompts"] / scale          # real seconds per prompt at steady state
    target = a["target_prompts"]
    predicted = plan.predict_s(a["prompts"], scale)
    with_overhead = plan.predict_s(a["prompts"], scale, overhead)
    return {"config": a["config"], "cost_scale": scale, "prompts": a["prompts"], "wall_s": round(wall, 1),
            "gpus_total": round(sum(plan.gpus.values()), 3), "nodes": plan.nodes, "gpus_per_node": plan.gpus_per_node,
            "pools": {k: {x: v for x, v in r.items() if x not in ("first", "last")} for k, r in report.items()},
            "min_busy": min(r["busy"] for r in report.values()),
            "min_busy_net": min(r["busy_net"] for r in report.values()), "overhead_s": round(overhead, 3),
            "min_busy_steady": min((r["busy_steady"] or 0.0) for r in report.values()),
            "steady_s": round(max(0.0, report[plan.lead]["last"] - max(r["first"] for r in report.values())), 2),
            # the plan's model against the stream as simulated (first batch started -> last batch done), without
            # and with this host's per-batch overhead
            "predicted_stream_s": round(predicted, 2), "predicted_with_overhead_s": round(with_overhead, 2),
            "simulated_stream_s": round(end - start, 2), "stream_ratio": round((end - start) / predicted, 3),
            "predict_prompts": target, "predicted_hours": round(plan.predict_s(target) / 3600, 2),
            "extrapolated_hours": round((target * per_prompt_s + (end - img["last"]) / scale) / 3600, 2),
            "ideal_hours": round(target * plan.work(plan.lead) / plan.gpus[plan.lead] / 3600, 2)}


def bench_cluster(work: Path, prompts: int = 1200, scale: float = 0.05, gpus: int = 8, shape: dict | None = None,
                  config: str = "pairs-9k.yaml", image_bytes: int = 16384, nodes: int = 1) -> dict:
    """Runs in a subprocess: it needs its own Ray, and the caller's connection stays as it is."""
    from pipelines.config import load_config
    target = load_config(REPO / "configs" / config, ["output_dir=x"]).prompts.num_prompts
    arg = {"out": str(work / "cluster"), "prompts": prompts, "scale": scale, "gpus": gpus, "nodes": nodes,
           "shape": shape, "config": config, "image_bytes": image_bytes, "target_prompts": target}
    for attempt in range(3):
        try:
            return run_child("cluster-child", arg, env={"RAY_ADDRESS": ""})
        except RuntimeError as e:
            # Ray gives a node 30 s to register (fixed in ray/_private/node.py): a busy shared host misses it
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
