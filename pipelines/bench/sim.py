"""The cluster simulation of `synthalign bench` (issue 7): a multi-node cluster with declared GPUs
(`ray.cluster_utils.Cluster`, in a subprocess of its own) runs the real Ray Data chain of `build_pipeline`
with sleep stand-ins for the GPU stages, costed from public A100 figures. It measures the busy fraction of each
pool between its first and last item and predicts the wall time of a full run on that cluster shape.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from pipelines.bench.child import REPO, run_child

SIM_ENV = "SYNTHALIGN_SIM"
# A100 seconds per item from public figures: SD3-Medium 1024² at 28 steps ≈ 3.1 s per image; a 7B VLM
# answer ≈ 0.5-1 s (13B ≈ 1.9× a 7B); ImageReward and ArmoRM ≈ 0.05 s per image / answer.
GPU_SECONDS = {"images": 3.1, "selection": 0.05, "rewards": 0.05, "sampling": 0.75, "sampling-13b": 1.4}


class _SimStage:
    """Sleep stand-in for a GPU stage: same constructor and columns as the real class; logs its busy spans."""
    KEY = ""

    def __init__(self, cfg, threads: int = 1, vocab=None):
        spec = json.loads(os.environ[SIM_ENV])
        self.cfg, self.key = cfg, self.KEY or f"sampling:{cfg.label}"
        self.per_item, self.log = spec["per_item"][self.key], Path(spec["log_dir"])
        self.image_bytes = spec["image_bytes"]

    def __call__(self, batch):
        t0, (batch, items) = time.time(), self.fill(batch)
        time.sleep(self.per_item * items)
        with open(self.log / f"{self.key.replace(':', '_')}-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"t0": t0, "t1": time.time(), "items": items}) + "\n")
        return batch


def _add(table, **cols):
    from actors.common.runtime import add_node_tag, with_columns
    return with_columns(add_node_tag(table, cols.pop("_stage")), cols)


class SimImages(_SimStage):
    KEY = "images"
    REQUIRES, ADDS = ("prompt_id", "image_prompt"), ("candidate_images", "candidate_seeds", "candidate_guidance",
                                                     "stage_nodes")

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
    REQUIRES, ADDS, DROPS = ("image_prompt", "candidate_images", "candidate_seeds", "candidate_guidance"), (
        "image", "image_score", "seed", "guidance_scale", "candidate_scores"), ("candidate_images",)

    def fill(self, batch):
        import pyarrow as pa
        cands = batch.column("candidate_images").to_pylist()
        return _add(batch.drop_columns(["candidate_images"]), _stage="selection",
                    image=pa.array([c[0] for c in cands], pa.binary()), image_score=[1.0] * len(cands),
                    seed=[0] * len(cands), guidance_scale=[5.0] * len(cands),
                    candidate_scores=[[1.0] * len(c) for c in cands]), sum(map(len, cands))


class SimSampler(_SimStage):
    REQUIRES, ADDS = ("image", "question", "pair_key"), ("answers", "answer_models")

    def fill(self, batch):
        n, keys = self.cfg.n, batch.column("pair_key").to_pylist()
        prev = batch.column("answers").to_pylist() if "answers" in batch.column_names else [[]] * len(keys)
        models = batch.column("answer_models").to_pylist() if "answers" in batch.column_names else [[]] * len(keys)
        return _add(batch, _stage=self.key, answers=[p + [f"{self.key} {j} {k}" for j in range(n)]
                                                      for p, k in zip(prev, keys)],
                    answer_models=[m + [self.cfg.label] * n for m in models]), n * len(keys)


class SimRewards(_SimStage):
    KEY = "rewards"
    REQUIRES = ("image", "question", "answers", "gt_objects")
    ADDS = ("reward_text", "reward_clip", "hallucinated", "reward_hallucination", "reward")

    def fill(self, batch):
        answers = batch.column("answers").to_pylist()
        score = [[float(len(a) % 7 + j) for j, a in enumerate(row)] for row in answers]
        zero = [[0.0] * len(row) for row in answers]
        return _add(batch, _stage="rewards", reward_text=score, reward_clip=zero, reward=score,
                    hallucinated=[[[] for _ in row] for row in answers], reward_hallucination=zero), \
            sum(map(len, answers))


SIM_STAGES = {"images": SimImages, "selection": SimSelection, "sampling": SimSampler, "rewards": SimRewards}


def sim_shape(cfg, gpus: float | None = None, shape: dict | None = None) -> dict[str, float]:
    """GPUs per pool: `shape` as given, else balanced for `gpus`: whole GPUs to diffusion, the others sized
    (fractions share a GPU) to keep up with it, 5% headroom."""
    cost = sim_costs(cfg)
    if shape:
        return {k: float(shape.get(k, shape.get("sampling", 1.0) if k.startswith("sampling:") else 1.0))
                for k in cost}
    per_prompt = {k: c * items for k, (c, items) in cost.items()}
    img = max(1, int(gpus * per_prompt["images"] / sum(per_prompt.values())))
    rate = img / per_prompt["images"]
    return {k: float(img) if k == "images" else round(v * rate * 1.05, 3) for k, v in per_prompt.items()}


def sim_costs(cfg) -> dict[str, tuple[float, int]]:
    """Pool key -> (A100 seconds per item, items per prompt)."""
    k, q = cfg.images.num_candidates, cfg.prompts.instructions_per_prompt
    out = {"images": (GPU_SECONDS["images"], k), "selection": (GPU_SECONDS["selection"], k)}
    for s in cfg.samplers:
        out[f"sampling:{s.label}"] = (GPU_SECONDS["sampling-13b" if "13b" in s.label else "sampling"], q * s.n)
    out["rewards"] = (GPU_SECONDS["rewards"], q * sum(s.n for s in cfg.samplers))
    return out


def cluster_child(a: dict) -> dict:
    """Own Ray: a head and two GPU node groups (diffusion_node, gpu_node), then the real chain on stand-ins."""
    import math
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    from actors.prompts import load_prompts
    from cluster.connect import connect
    from cluster.resources import PoolConfig
    from pipelines.config import load_config
    from pipelines.generate.job import (
        build_pipeline,
        load_vocab,
        prompt_table,
        write_scored,
    )
    work = Path(a["out"])
    shutil.rmtree(work, ignore_errors=True)
    (work / "log").mkdir(parents=True)
    cfg = load_config(REPO / "configs" / a["config"], [f"output_dir={work / 'run'}",
                                                       f"prompts.num_prompts={a['prompts']}"])
    gpus, costs, pools, per_item = sim_shape(cfg, a["gpus"], a["shape"]), sim_costs(cfg), {}, {}
    for key, g in gpus.items():
        size = max(1, math.ceil(g))
        node = "diffusion_node" if key == "images" else "gpu_node"
        pools[key] = PoolConfig(size=size, batch_size=cfg.pool(key.split(":")[0]).batch_size, num_cpus=0.25,
                                num_gpus=g / size, resources={node: 0.001})
        per_item[key] = costs[key][0] * a["scale"] / (g / size)
    cfg.pools = pools
    os.environ[SIM_ENV] = json.dumps({"per_item": per_item, "log_dir": str(work / "log"),
                                      "image_bytes": a["image_bytes"]})  # raylets and their workers inherit it
    other = sum(g for k, g in gpus.items() if k != "images")
    common = {"object_store_memory": 200 * 1024 ** 2}  # (127.0.0.1 would not do: ray.init maps it to the host IP)
    # A private temp dir: a plain `ray.init()` elsewhere on this machine must not join this cluster.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="sa-sim-", dir="/tmp")  # short: socket path limits
    c = Cluster(initialize_head=True, head_node_args={**common, "num_cpus": 2, "include_dashboard": False})
    try:
        c.add_node(**common, num_cpus=8, num_gpus=math.ceil(gpus["images"]), resources={"diffusion_node": 1})
        c.add_node(**common, num_cpus=8, num_gpus=math.ceil(other) + 1, resources={"gpu_node": 1})  # +1: packing
        c.wait_for_nodes()
        connect(c.address)
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
        spans.setdefault(f.stem.rsplit("-", 1)[0], []).extend(json.loads(ln) for ln in f.read_text().splitlines())
    report, scale = {}, a["scale"]
    for key, g in gpus.items():
        s = spans.get(key.replace(":", "_"), [])
        first, last = min(x["t0"] for x in s), max(x["t1"] for x in s)
        report[key] = {"gpus": g, "actors": pools[key].size, "a100_s_per_item": costs[key][0],
                       "busy": round(sum(x["t1"] - x["t0"] for x in s) / (pools[key].size * (last - first)), 3),
                       "window_s": round(last - first, 2), "first": first, "last": last}
    img = report["images"]
    end = max(r["last"] for r in report.values())
    per_prompt_s = img["window_s"] / a["prompts"] / scale          # real seconds per prompt at steady state
    target = a["target_prompts"]
    return {"config": a["config"], "cost_scale": scale, "prompts": a["prompts"], "wall_s": round(wall, 1),
            "gpus_total": round(sum(gpus.values()), 3), "pools": {k: {x: v for x, v in r.items() if x not in (
                "first", "last")} for k, r in report.items()},
            "min_busy": min(r["busy"] for r in report.values()),
            "predict_prompts": target, "predicted_hours": round((target * per_prompt_s + (end - img["last"]) / scale)
                                                                / 3600, 2),
            "ideal_hours": round(target * costs["images"][0] * costs["images"][1] / gpus["images"] / 3600, 2)}


def bench_cluster(work: Path, prompts: int = 600, scale: float = 0.02, gpus: float = 8, shape: dict | None = None,
                  config: str = "pairs-9k.yaml", image_bytes: int = 16384) -> dict:
    """Runs in a subprocess: it needs its own Ray, and the caller's connection stays as it is."""
    from pipelines.config import load_config
    target = load_config(REPO / "configs" / config, ["output_dir=x"]).prompts.num_prompts
    return run_child("cluster-child", {"out": str(work / "cluster"), "prompts": prompts, "scale": scale, "gpus": gpus,
                                    "shape": shape, "config": config, "image_bytes": image_bytes,
                                    "target_prompts": target}, env={"RAY_ADDRESS": ""})
