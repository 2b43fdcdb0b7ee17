"""`synthalign plan`: pool sizes and GPU fractions that balance the generate chain's stages on a GPU cluster.

Each pool's work per prompt is (GPU-seconds per item) x (items per prompt). The heaviest pool (diffusion, for the
paper's recipe) gets whole GPUs, one actor each; every other pool gets the GPU share that keeps up with it plus
5% headroom (a share above 1 is split over several actors). The lead pool takes as many GPUs as leave room for
the others. Per-item costs default to public A100 figures below, scaled to the config's steps, image size,
answer length and model size; measured ones (`--costs FILE`) replace them. No share is smaller than its model's
memory (pipelines/plan_memory.py: weights, KV cache or activations) on a GPU of `--gpu-memory` GiB; a model that
fits no GPU is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from actors.common.errors import InputError
from cluster.resources import PoolConfig
from pipelines.plan_memory import (
    VLLM_MARGIN,
    Need,
    grow_engines,
    kv_seqs,
    memory_floor,
    memory_problems,
    pool_needs,
    with_tensor_parallel,
)

# Public A100-80GB figures the defaults derive from (all dense bf16/fp16):
# SD3-Medium at 1024x1024, 50 steps: MMDiT 5,468 ms, text encoders + VAE decode 110 ms (Stability AI's
# SD3-Medium TensorRT model card, huggingface.co/stabilityai/stable-diffusion-3-medium-tensorrt): 0.109 s a step.
SD3_STEP_S, SD3_FIXED_S, SD3_PX = 5.468 / 50, 0.110, 1024 * 1024
# vLLM 0.4.3 offline throughput, Llama-7B on one A100: 7,516 tokens/s, prompt and output tokens together
# (github.com/vllm-project/vllm/pull/5046). A LLaVA-1.6 answer reads up to 2,880 image tokens (5 tiles x 576).
VLLM_7B_TOKENS_S, LLAVA16_IMAGE_TOKENS, QUESTION_TOKENS = 7516.0, 2880, 64
# Scoring is one forward pass: 2 x params x tokens FLOPs at 40% of the A100's 312 TFLOPS (NVIDIA A100 datasheet).
A100_FLOPS, MFU = 312e12, 0.4
# ImageReward: BLIP ViT-L/16 + a 12-layer text encoder, ~0.47B parameters over ~600 tokens; CLIP ViT-L/14 ~0.43B.
SCORER_PARAMS_B = {"imagereward": 0.47, "clip": 0.43, "none": 0.0}
SCORER_TOKENS = 600
# A LLaVA-1.6 judge reads the image's tokens and the question per object; prompts and answers name ~2 objects.
JUDGE_TOKENS, JUDGE_OBJECTS = LLAVA16_IMAGE_TOKENS + QUESTION_TOKENS, 2
MIN_COST_S = 1e-3      # a CPU-side stage (shapes images, no scorer) still takes its turn
HEADROOM = 1.05
SHARE_STEP = 0.001     # GPU fractions in thousandths (Ray resolves 1e-4): a coarser step idles the small pools
GPU_GIB = 80.0         # A100/H100 80 GB: 80 GiB of device memory


def params_b(model: str, default: float = 7.0) -> float:
    """Billions of parameters from a model name (llava-v1.6-vicuna-13b-hf -> 13); `default` when it says none."""
    m = re.findall(r"(\d+(?:\.\d+)?)b(?![a-z])", Path(model).name.lower())
    return float(m[-1]) if m else default


def flops_seconds(params: float, tokens: float) -> float:
    return 2 * params * 1e9 * tokens / (A100_FLOPS * MFU)


def default_costs(cfg) -> dict[str, float]:
    """A100 GPU-seconds per item, by pool key, at the config's settings."""
    im = cfg.images
    image = SD3_FIXED_S + im.steps * SD3_STEP_S * (im.height * im.width / SD3_PX)
    sel = cfg.selection
    # A judge asks one question per object the prompt names, each a forward pass over the image's tokens.
    selection = flops_seconds(params_b(sel.model), JUDGE_TOKENS * JUDGE_OBJECTS) if sel.scorer == "judge" else \
        flops_seconds(SCORER_PARAMS_B.get(sel.scorer, 0.47), SCORER_TOKENS)
    out = {"images": image if im.backend != "shapes" else MIN_COST_S, "selection": selection}
    answer_tokens = []
    for s in cfg.samplers:
        tokens = LLAVA16_IMAGE_TOKENS + QUESTION_TOKENS + s.max_new_tokens
        out[s.pool_key] = tokens / VLLM_7B_TOKENS_S * params_b(s.model) / 7.0
        answer_tokens.append(QUESTION_TOKENS + s.max_new_tokens)
    r = cfg.rewards
    reward = flops_seconds(params_b(r.text_model, 8.0), max(answer_tokens or [0])) if r.text_model else 0.0
    if r.clip_model and r.weights.get("clip"):
        reward += flops_seconds(SCORER_PARAMS_B["clip"], SCORER_TOKENS)
    if r.judge_model and r.weights.get("judge"):   # one question per object an answer claims
        reward += flops_seconds(params_b(r.judge_model), JUDGE_TOKENS * JUDGE_OBJECTS)
    out["rewards"] = reward
    return {k: max(v, MIN_COST_S) for k, v in out.items()}


def items_per_prompt(cfg) -> dict[str, tuple[int, int]]:
    """Pool key -> (rows per prompt it sees, items per row), in chain order."""
    k, q = cfg.images.num_candidates, cfg.prompts.instructions_per_prompt
    out = {"images": (1, k), "selection": (1, k)}
    out.update({s.pool_key: (q, s.n) for s in cfg.samplers})
    out["rewards"] = (q, sum(s.n for s in cfg.samplers))
    return out


def read_costs(path: str | Path, keys) -> dict[str, float]:
    """Measured GPU-seconds per item from a YAML/JSON mapping; `sampling` sets every sampler without its own."""
    path = Path(path)
    if not path.is_file():
        raise InputError("costs file not found", file=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"YAML syntax error: {e}", file=str(path)) from None
    if not isinstance(data, dict):
        raise InputError("expected a mapping of pool -> GPU-seconds per item", file=str(path))
    out = {}
    for key, v in data.items():
        if key not in keys and key != "sampling":
            raise InputError(f"unknown pool (known: {', '.join(keys)}, sampling)", file=str(path), field=str(key))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise InputError(f"must be a positive number of seconds, got {v!r}", file=str(path), field=str(key))
        out[key] = float(v)
    spread = {k: out["sampling"] for k in keys if k.startswith("sampling:")} if "sampling" in out else {}
    return {**spread, **{k: v for k, v in out.items() if k != "sampling"}}


def split(gpus: float, tp: int = 1) -> tuple[int, float]:
    """A pool's GPU share as (actors, GPUs per actor): no actor holds more than one GPU, but an engine sharded
    over `tp` GPUs (tensor parallel) holds exactly tp whole ones."""
    if tp > 1:
        return max(1, math.ceil(gpus / tp - 1e-9)), float(tp)
    size = max(1, math.ceil(gpus - 1e-9))
    return size, math.ceil(gpus / size / SHARE_STEP - 1e-9) * SHARE_STEP


def pack(actors: dict[str, tuple[int, float]], gpus: int, per_node: int | None = None) -> list[list[str]] | None:
    """First-fit decreasing of actor shares (pool -> (actors, share each)) onto `gpus` devices, `per_node` to a
    node: a fraction never spans two devices, a share of n > 1 GPUs takes n free devices of one node. The pools
    on each device, or None when they do not fit."""
    per_node = per_node or gpus
    free, bins = [1.0] * gpus, [[] for _ in range(gpus)]
    for k, s in sorted(((k, a) for k, (size, a) in actors.items() for _ in range(size)), key=lambda x: -x[1]):
        if s > 1 + 1e-9:
            n = round(s)
            node = next((node for node in range(0, gpus, per_node)
                         if sum(f >= 1 - 1e-9 for f in free[node:node + per_node]) >= n), None)
            if node is None:
                return None
            for i in [i for i in range(node, node + per_node) if free[i] >= 1 - 1e-9][:n]:
                free[i] = 0.0
                bins[i].append(k)
            continue
        i = next((i for i, f in enumerate(free) if f >= s - 1e-9), None)
        if i is None:
            return None
        free[i] -= s
        bins[i].append(k)
    return bins


@dataclass
class Plan:
    config: str
    nodes: int
    gpus_per_node: int
    prompts: int
    costs: dict[str, float]            # GPU-seconds per item
    measured: list[str]                # keys whose cost came from --costs
    rows: dict[str, tuple[int, int]]   # rows per prompt, items per row
    gpus: dict[str, float]             # GPUs each pool holds (size x num_gpus)
    pools: dict[str, PoolConfig]
    gpu_gib: float = GPU_GIB           # memory of one GPU
    needs: dict[str, Need] = dataclasses.field(default_factory=dict)   # memory one actor needs, by pool

    def work(self, key: str) -> float:
        """GPU-seconds per prompt."""
        rows, items = self.rows[key]
        return self.costs[key] * rows * items

    @property
    def lead(self) -> str:
        """The bottleneck: the pool with the fewest prompts per second."""
        return min(self.rows, key=lambda k: self.gpus[k] / self.work(k))

    @property
    def prompts_per_s(self) -> float:
        return min(self.gpus[k] / self.work(k) for k in self.rows)

    def predict_s(self, prompts: int | None = None, scale: float = 1.0, overhead_s: float | dict = 0.0) -> float:
        """Wall time of the stream, batch by batch: each pool takes rows in arrival order, `batch_size` at a
        time (the rest when the stream ends), on whichever of its actors frees first; a batch takes its items'
        GPU-seconds over the actor's share (x `scale`, + `overhead_s`, or its pool's entry). A model of the
        chain's timing, not a scheduler: Ray Data runs the real one."""
        import heapq
        ready = [0.0] * (prompts or self.prompts)          # when each prompt's rows reach the next pool
        for key, (rows_pp, items) in self.rows.items():
            p = self.pools[key]
            rows = sorted((t, i) for i, t in enumerate(ready) for _ in range(rows_pp))
            free, done = [0.0] * p.size, [0.0] * len(ready)
            per_row = items * self.costs[key] * scale / p.num_gpus
            extra = overhead_s.get(key, 0.0) if isinstance(overhead_s, dict) else overhead_s
            for b in range(0, len(rows), p.batch_size):
                batch = rows[b:b + p.batch_size]
                start = max(batch[-1][0], heapq.heappop(free))
                end = start + len(batch) * per_row + extra
                heapq.heappush(free, end)
                for _, i in batch:
                    done[i] = max(done[i], end)
            ready = done
        return max(ready)

    def summary(self) -> dict:
        return {"config": self.config, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "gpus_used": round(sum(self.gpus.values()), 3), "prompts": self.prompts,
                "prompts_per_hour": round(self.prompts_per_s * 3600, 1), "lead": self.lead,
                "predicted_hours": round(self.predict_s() / 3600, 3),
                "pools": {k: {"size": p.size, "num_gpus": p.num_gpus, "gpus": self.gpus[k],
                              "s_per_item": round(self.costs[k], 4), "items_per_prompt": self.rows[k][0] *
                              self.rows[k][1], "cost": "measured" if k in self.measured else "default",
                              "prompts_per_hour": round(self.gpus[k] / self.work(k) * 3600, 1),
                              **self.memory(k)}
                          for k, p in self.pools.items()}, "gpu_memory_gib": self.gpu_gib}

    def memory(self, key: str) -> dict:
        """GiB one actor of the pool needs (weights + KV cache or activations + runtime) and may use."""
        n = self.needs.get(key)
        if n is None:
            return {}
        return {"need_gib": round(n.total, 2), "weights_gib": round(n.weights, 2), "work_gib": round(n.work, 2),
                "share_gib": round(self.pools[key].num_gpus / n.tp * self.gpu_gib, 1), "tensor_parallel": n.tp}


def make_plan(cfg, gpus_per_node: int, nodes: int = 1, costs: dict[str, float] | None = None,
              config: str = "", gpu_gib: float = GPU_GIB) -> Plan:
    """Balance the running pools of `cfg` for `nodes` x `gpus_per_node` GPUs of `gpu_gib` GiB each: every share
    at least its model's memory."""
    if gpus_per_node < 1 or nodes < 1:
        raise InputError(f"need at least one GPU on at least one node (got --gpus {gpus_per_node}, "
                         f"--nodes {nodes})", field="--gpus")
    if not gpu_gib > 0:
        raise InputError(f"GPU memory must be a positive number of GiB, got {gpu_gib:g}", field="--gpu-memory")
    cfg = with_tensor_parallel(cfg, gpu_gib, gpus_per_node)
    rows = items_per_prompt(cfg)
    cost = {**default_costs(cfg), **(costs or {})}
    work = {k: cost[k] * r * i for k, (r, i) in rows.items()}
    needs = pool_needs(cfg, kv_seqs(cfg, {}, gpu_gib))
    floor = memory_floor(cfg, needs, gpu_gib, SHARE_STEP)
    lead, total = max(work, key=work.get), gpus_per_node * nodes
    for lead_gpus in range(total, 0, -1):
        rate = lead_gpus / work[lead]
        share = {k: float(lead_gpus) if k == lead else work[k] * rate * HEADROOM for k in work}
        actors = {k: (size, round(max(a, floor[k]), 3)) for k, (size, a) in
                  ((k, split(g, needs[k].tp)) for k, g in share.items())}
        bins = pack(actors, total, gpus_per_node)
        if bins is not None:
            break
    else:
        raise InputError(f"{total} GPU(s) cannot hold one {lead} GPU and the pools that keep up with it and hold "
                         f"their models", field="--gpus")
    actors = grow_engines(cfg, actors, bins, gpu_gib, SHARE_STEP)
    samplers = {s.pool_key: s for s in cfg.samplers}
    pools = {k: dataclasses.replace(cfg.pool(k.split(":")[0], samplers.get(k)), size=size, max_size=None,
                                    num_gpus=round(a, 3), resources={})
             for k, (size, a) in actors.items()}
    needs = pool_needs(cfg, kv_seqs(cfg, {k: p.num_gpus for k, p in pools.items()}, gpu_gib))
    return Plan(config, nodes, gpus_per_node, cfg.prompts.num_prompts, cost, sorted(costs or {}), rows,
                {k: round(p.size * p.num_gpus, 3) for k, p in pools.items()}, pools, gpu_gib, needs)


def plan_config(plan: Plan, cfg, source: Path, out: Path) -> dict:
    """The config `out` holds: `extends:` the input, with the plan's pools and cluster; each vLLM engine takes 0.02
    less of its GPU than its pool's share, with the KV cache for the max_num_seqs the plan gave it."""
    keep = ("size", "batch_size", "num_cpus", "num_gpus", "threads", "resources")
    pools = {k: {f: getattr(p, f) for f in keep} for k, p in plan.pools.items()}
    data = {"extends": os.path.relpath(source.resolve(), out.resolve().parent),
            "cluster": {"nodes": plan.nodes, "gpus_per_node": plan.gpus_per_node}, "fuse": False, "pools": pools}
    samplers, changed = [], False
    for s in cfg.samplers:
        key = s.pool_key
        share, need = plan.pools[key].num_gpus, plan.needs.get(key)
        if need and need.tp != s.tensor_parallel_size:   # the plan sharded an engine no single GPU holds
            s, changed = dataclasses.replace(s, tensor_parallel_size=need.tp), True
        if s.backend == "vllm":
            gmu = s.gpu_memory_utilization
            if (share < 1 and gmu > share - VLLM_MARGIN) or (need and need.total > gmu * plan.gpu_gib):
                gmu = round(min(share, 1.0) - VLLM_MARGIN, 3)
            seqs = need.seqs if need else s.max_num_seqs
            if (gmu, seqs) != (s.gpu_memory_utilization, s.max_num_seqs):
                s, changed = dataclasses.replace(s, gpu_memory_utilization=gmu, max_num_seqs=seqs), True
        default = type(s)()   # a list replaces the parent's whole list: write each sampler, its own keys only
        samplers.append({k: v for k, v in dataclasses.asdict(s).items() if v != getattr(default, k)})
    if changed:
        data["samplers"] = samplers
    return data


def write_plan(plan: Plan, cfg, source: str | Path, out: str | Path) -> Path:
    """Write the planned config and check it loads, placement included."""
    from pipelines.config import load_config
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    s = plan.summary()
    mem = f" --gpu-memory {plan.gpu_gib:g}" if plan.gpu_gib != GPU_GIB else ""
    need = [f"{k} {n.total:.1f}/{plan.pools[k].num_gpus / n.tp * plan.gpu_gib:.1f}" for k, n in plan.needs.items()]
    head = (f"# Written by `synthalign plan {source} --gpus {plan.gpus_per_node} --nodes {plan.nodes}{mem}`: "
            f"{s['gpus_used']:g} of {plan.nodes * plan.gpus_per_node} GPUs,\n# {s['prompts_per_hour']:g} prompts "
            f"an hour, {s['predicted_hours']:g} h predicted for {plan.prompts} prompts (costs: "
            f"{', '.join(f'{k} {v:.3g} s' for k, v in plan.costs.items())}).\n# GiB an actor needs / its share "
            f"of a {plan.gpu_gib:g} GiB GPU: {', '.join(need)}.\n")
    tmp = out.with_name(f".{out.name}.tmp")   # checked before it takes the name: a bad plan leaves nothing
    try:
        tmp.write_text(head + yaml.safe_dump(plan_config(plan, cfg, Path(source), out), sort_keys=False,
                                             default_flow_style=None, width=120))
        problems = memory_problems(load_config(tmp), plan.gpu_gib)
        if problems:   # the plan's own arithmetic: never expected
            raise InputError(problems[0], file=str(out))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def table(plan: Plan) -> str:
    s = plan.summary()
    lines = [f"{'pool':<34} {'actors':>6} {'GPU each':>8} {'GPUs':>6} {'s/item':>8} {'items/prompt':>12} "
             f"{'prompts/h':>10}  cost     GiB need/share"]
    for k, p in s["pools"].items():
        mem = f"{p['need_gib']:>6.1f}/{p['share_gib']:g}" if "need_gib" in p else ""
        lines.append(f"{k:<34} {p['size']:>6} {p['num_gpus']:>8g} {p['gpus']:>6g} {p['s_per_item']:>8g} "
                     f"{p['items_per_prompt']:>12} {p['prompts_per_hour']:>10g}  {p['cost']:<8} {mem}")
    lines.append(f"{s['gpus_used']:g} of {plan.nodes} x {plan.gpus_per_node} GPUs; {s['prompts_per_hour']:g} prompts/h "
                 f"(lead: {s['lead']}); predicted wall time for {plan.prompts} prompts: {s['predicted_hours']:g} h")
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.summary(), indent=2)
