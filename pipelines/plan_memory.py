"""GPU memory of the generate chain's pools, for `synthalign plan`: what each pool's model needs on its GPU share.

need = weights (parameters x bytes of the dtype) + the working memory the stage cannot run without (a vLLM
engine's KV cache for max_model_len x max_num_seqs tokens; SD3's activations for one diffusers call) + RUNTIME_GIB.
Parameter counts come from a local model folder's safetensors headers (exact; a few KB read a file), else from
PUBLIC below. Everything in GiB (2^30 bytes), as nvidia-smi and vLLM report it.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from actors.common.errors import InputError

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}
QUANT_BYTES = {"fp8": 1.0, "awq": 0.5, "gptq": 0.5}   # bytes a weight of a vLLM-quantized model
# CUDA context, allocator slack, and for vLLM its profile run's activation peak and CUDA graphs (vLLM's startup
# log breaks these down; ~1-2 GiB for 7-13B models): an estimate, one per GPU actor.
RUNTIME_GIB = 2.0
VLLM_MARGIN = 0.02    # a vLLM engine takes this much less of its GPU than its pool's share (plan_config)
PLAN_SEQS = 8         # sequences a vLLM engine's KV cache holds at least when max_num_seqs is unset

# Public parameter counts (billions) by model name, per component, and the LLMs' KV dimensions
# (layers, KV heads, head dim). Sources: the safetensors index of each Hugging Face repo (its parameter count),
# the model's config.json for the dimensions.
# - stabilityai/stable-diffusion-3-medium-diffusers: MMDiT 2.03B (transformer/), CLIP-L text 0.124B
#   (text_encoder/), OpenCLIP bigG text 0.695B (text_encoder_2/), T5-XXL encoder 4.76B (text_encoder_3/),
#   VAE 0.084B: 7.69B, 15.4 GB in fp16 (the repo's sd3_medium_incl_clips_t5xxlfp16.safetensors: 15.8 GB).
# - THUDM/ImageReward: ImageReward.pt, 1.79 GB of float32 (BLIP ViT-L + BERT-base text encoder + MLP): 0.447B.
# - openai/clip-vit-large-patch14: 0.428B.
# - llava-hf/llava-v1.6-mistral-7b-hf 7.57B (Mistral-7B: 32 layers, 8 KV heads of 128);
#   llava-v1.6-vicuna-7b-hf 7.06B and llava-1.5-7b-hf 7.06B (Llama-2-7B: 32 layers, 32 KV heads of 128);
#   llava-v1.6-vicuna-13b-hf 13.4B (Llama-2-13B: 40 layers, 40 KV heads of 128).
# - RLHFlow/ArmoRM-Llama3-8B-v0.1: 7.51B (Llama-3-8B without its LM head, plus the reward heads).
PUBLIC = {
    "stable-diffusion-3-medium-diffusers": {"transformer": 2.028, "text_encoder": 0.124, "text_encoder_2": 0.695,
                                            "text_encoder_3": 4.762, "vae": 0.084},
    "imagereward-v1.0": {"model": 0.447},
    "clip-vit-large-patch14": {"model": 0.428},
    "llava-v1.6-mistral-7b-hf": {"model": 7.57},
    "llava-v1.6-vicuna-7b-hf": {"model": 7.06},
    "llava-v1.6-vicuna-13b-hf": {"model": 13.4},
    "llava-1.5-7b-hf": {"model": 7.06},
    "armorm-llama3-8b-v0.1": {"model": 7.51},
}
PUBLIC["imagereward"] = PUBLIC["imagereward-v1.0"]
KV_DIMS = {"llava-v1.6-mistral-7b-hf": (32, 8, 128), "llava-v1.6-vicuna-7b-hf": (32, 32, 128),
           "llava-v1.6-vicuna-13b-hf": (40, 40, 128), "llava-1.5-7b-hf": (32, 32, 128)}

# SD3 activations for one diffusers call, an estimate from tensor shapes (not measured): the MMDiT (hidden 1536)
# sees (H/16)(W/16) image tokens + 333 text tokens per image, twice with classifier-free guidance, with ~16 live
# tensors of tokens x hidden; the VAE decoder holds ~6 128-channel tensors at full resolution per image it decodes
# (the whole call at once; one at a time with vae_slicing; 512-px tiles with vae_tiling).
SD3_HIDDEN, SD3_TEXT_TOKENS, SD3_LIVE, VAE_LIVE, VAE_TILE = 1536, 333, 16, 6 * 128, 512


def _name(model: str) -> str:
    return Path(model.rstrip("/")).name.lower()


def safetensors_params(folder: Path) -> int:
    """Parameters in a folder's *.safetensors files, from their headers (8-byte length, then JSON)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(n, 100 * 2 ** 20)))
            total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
            continue   # not a safetensors file after all: the plan falls back as for a hub id
    return total


def components(model: str, skip: tuple[str, ...] = ()) -> dict[str, float] | None:
    """Billions of parameters per component: a local folder's (a diffusers pipeline's subfolders, a checkpoint
    of .pt/.bin stored in float32 by its size / 4), else PUBLIC's, else the size its name gives; None when
    nothing does (its weights then count as 0)."""
    p = Path(model)
    if model and p.is_dir():
        out = {}
        try:
            subs = sorted(d for d in p.iterdir() if d.is_dir())
        except OSError:
            subs = []
        for sub in [p] + subs:
            key = "model" if sub == p else sub.name
            if key in skip:
                continue
            n = safetensors_params(sub)
            if not n:
                n = sum(f.stat().st_size for ext in ("*.pt", "*.bin") for f in sub.glob(ext)) // 4
            if n:
                out[key] = n / 1e9
        return out or None
    public = PUBLIC.get(_name(model))
    if public is None:   # a size in the name (llava-v1.6-34b-hf -> 34B) rather than nothing
        sizes = re.findall(r"(\d+(?:\.\d+)?)b(?![a-z])", _name(model))
        return {"model": float(sizes[-1])} if sizes else None
    return {k: v for k, v in public.items() if k not in skip}


def kv_dims(model: str) -> tuple[int, int, int] | None:
    """(layers, KV heads, head dim) of an LLM: from a local config.json (a VLM's text_config), else KV_DIMS."""
    f = Path(model) / "config.json"
    try:
        c = json.loads(f.read_text())
        c = c.get("text_config", c)
        heads = c["num_attention_heads"]
        return (c["num_hidden_layers"], c.get("num_key_value_heads") or heads,
                c.get("head_dim") or c["hidden_size"] // heads)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return KV_DIMS.get(_name(model))   # no readable config.json: a hub id


def kv_bytes_per_token(model: str, dtype: str) -> float | None:
    dims = kv_dims(model)
    return None if dims is None else 2 * math.prod(dims) * DTYPE_BYTES.get(dtype, 2)   # K and V, every layer


@dataclass
class Need:
    """One actor's memory, GiB."""
    model: str
    weights: float
    work: float                  # KV cache or activations
    work_label: str              # what `work` holds, for the refusal and the runbook table
    seqs: int | None = None      # a vLLM engine's max_num_seqs
    tp: int = 1                  # GPUs a vLLM engine shards weights and KV cache over (tensor parallel)

    @property
    def total(self) -> float:
        """GiB on each of the actor's GPUs."""
        return (self.weights + self.work) / self.tp + RUNTIME_GIB

    def describe(self) -> str:
        over = f", each of {self.tp} GPUs" if self.tp > 1 else ""
        return (f"{self.total:.1f} GiB ({self.model}: weights {self.weights:.1f}, {self.work_label} "
                f"{self.work:.1f}{over}, runtime {RUNTIME_GIB:g})")


def _weights_gib(model: str, dtype_bytes: float, skip=()) -> float:
    comp = components(model, skip)
    return 0.0 if comp is None else sum(comp.values()) * 1e9 * dtype_bytes / GiB


def images_need(im) -> Need:
    """SD3 (or any diffusers pipeline): its weights in images.dtype, T5 left out with drop_t5; one call's
    activations. With cpu_offload only the largest component is on the GPU at a time."""
    if im.backend == "shapes":
        return Need("shapes", 0.0, 0.0, "activations")
    b = DTYPE_BYTES.get(im.dtype, 4)
    comp = components(im.model, ("text_encoder_3",) if getattr(im, "drop_t5", False) else ()) or {}
    weights = (max(comp.values(), default=0.0) if getattr(im, "cpu_offload", False) else sum(comp.values()))
    tokens = (im.height // 16) * (im.width // 16) + SD3_TEXT_TOKENS
    dit = 2 * im.batch_size * tokens * SD3_HIDDEN * b * SD3_LIVE     # x2: classifier-free guidance
    side = min(im.height, VAE_TILE) * min(im.width, VAE_TILE) if getattr(im, "vae_tiling", False) else \
        im.height * im.width
    decoded = 1 if getattr(im, "vae_slicing", False) or getattr(im, "vae_tiling", False) else im.batch_size
    vae = decoded * side * VAE_LIVE * b
    return Need(im.model, weights * 1e9 * b / GiB, max(dit, vae) / GiB,
                f"activations ({im.batch_size} x {im.height}x{im.width})")


def sampler_need(s, seqs: int | None = None) -> Need:
    """A sampler's weights; for vLLM, its KV cache for max_model_len x `seqs` (default: max_num_seqs or
    PLAN_SEQS) tokens."""
    b = QUANT_BYTES.get(s.quantization or "", DTYPE_BYTES.get(s.dtype, 4)) if s.backend == "vllm" else \
        DTYPE_BYTES.get(s.dtype, 4)
    weights = _weights_gib(s.model, b)
    if s.backend != "vllm":
        return Need(s.model, weights, 0.0, "activations")
    seqs = seqs or s.max_num_seqs or PLAN_SEQS
    per_token = kv_bytes_per_token(s.model, s.dtype) or 0.0
    return Need(s.model, weights, per_token * s.max_model_len * seqs / GiB,
                f"KV cache ({seqs} x {s.max_model_len} tokens)", seqs, s.tensor_parallel_size)


def seq_gib(s) -> float:
    """KV cache of one max_model_len sequence of a vLLM sampler."""
    return (kv_bytes_per_token(s.model, s.dtype) or 0.0) * s.max_model_len / GiB


def selection_need(sel) -> Need:
    if sel.scorer == "none":
        return Need("none", 0.0, 0.0, "activations")
    return Need(sel.model, _weights_gib(sel.model, DTYPE_BYTES.get(getattr(sel, "dtype", "float32"), 4)), 0.0,
                "activations")


def rewards_need(r) -> Need:
    b = DTYPE_BYTES.get(r.dtype, 4)
    weights = _weights_gib(r.text_model, b) if r.text_model else 0.0
    if r.clip_model and r.weights.get("clip"):
        weights += _weights_gib(r.clip_model, b)
    if getattr(r, "judge_model", "") and r.weights.get("judge"):
        weights += _weights_gib(r.judge_model, b)
    return Need(r.text_model or r.clip_model or getattr(r, "judge_model", "") or "none", weights, 0.0, "activations")


def pool_needs(cfg, seqs: dict[str, int] | None = None) -> dict[str, Need]:
    """Need per actor, by pool key (a sampler's as sampling:<name>); `seqs`: KV sequences by pool key."""
    out = {"images": images_need(cfg.images), "selection": selection_need(cfg.selection)}
    for s in cfg.samplers:
        key = s.pool_key
        out[key] = sampler_need(s, (seqs or {}).get(key))
    out["rewards"] = rewards_need(cfg.rewards)
    return out


def share_gib(cfg, key: str, share: float, gpu_gib: float) -> float:
    """Memory an actor of pool `key` holding `share` of a GPU may use: a vLLM engine takes its
    gpu_memory_utilization of the device, whatever share Ray granted."""
    s = next((s for s in cfg.samplers if s.pool_key == key), None)
    if s is not None and s.backend == "vllm":   # per GPU of the engine's tensor_parallel_size
        share = min(share / s.tensor_parallel_size, s.gpu_memory_utilization)
    return share * gpu_gib


def memory_problems(cfg, gpu_gib: float) -> list[str]:
    """One line per running pool whose model cannot fit its GPU share (pools without GPUs are not checked)."""
    pools, out = cfg.running_pools(), []
    for key, need in pool_needs(cfg).items():
        p = pools.get(key)
        if p is None or not p.num_gpus:
            continue
        have = share_gib(cfg, key, p.num_gpus, gpu_gib)
        if need.total > have + 1e-9:
            out.append(f"pool {key} needs {need.describe()} but its share is {p.num_gpus:g} x {gpu_gib:g} GiB "
                       f"= {have:.1f} GiB")
    return out


def vllm_samplers(cfg) -> dict:
    return {s.pool_key: s for s in cfg.samplers if s.backend == "vllm"}


def memory_floor(cfg, needs: dict[str, Need], gpu_gib: float, share_step: float) -> dict[str, float]:
    """The least GPU share each pool's actor can hold its model in; a model no GPU holds is refused."""
    vllm, out = vllm_samplers(cfg), {}
    for k, need in needs.items():
        share = need.total / gpu_gib + (VLLM_MARGIN if k in vllm else 0.0)
        if share > 1 + 1e-9:
            hint = " (set its max_num_seqs or max_model_len lower)" if k in vllm and need.work else ""
            raise InputError(f"pool {k} needs {need.describe()} but its share is at most 1 x {gpu_gib:g} GiB"
                             f"{hint}", field="--gpu-memory")
        # a sharded engine holds its GPUs whole
        out[k] = float(need.tp) if need.tp > 1 else math.ceil(share / share_step - 1e-9) * share_step
    return out


def with_tensor_parallel(cfg, gpu_gib: float, gpus_per_node: int):
    """`cfg` with each vLLM sampler that fits no single GPU (tensor_parallel_size 1, PLAN_SEQS sequences or its
    max_num_seqs) sharded over the fewest GPUs of one node that hold it: 2, 4 or 8. Others are kept as set."""
    import dataclasses
    samplers = []
    for s in cfg.samplers:
        if s.backend == "vllm" and s.tensor_parallel_size == 1:
            for tp in (1, 2, 4, 8):
                if tp > gpus_per_node:
                    break
                trial = dataclasses.replace(s, tensor_parallel_size=tp)
                if sampler_need(trial).total / gpu_gib + VLLM_MARGIN <= 1 + 1e-9:
                    s = trial
                    break
        samplers.append(s)
    return dataclasses.replace(cfg, samplers=samplers)


def kv_seqs(cfg, shares: dict[str, float], gpu_gib: float) -> dict[str, int]:
    """max_num_seqs of each vLLM engine: its config's, else as many max_model_len sequences as its share holds
    beside the weights, at least PLAN_SEQS, at most one call's requests (pool batch_size x n)."""
    out = {}
    for k, s in vllm_samplers(cfg).items():
        call = cfg.pool("sampling", s).batch_size * s.n
        if s.max_num_seqs:
            out[k] = s.max_num_seqs
        elif k not in shares:
            out[k] = min(PLAN_SEQS, call)
        else:   # per GPU of the engine: its slice of the weights and of each sequence's KV cache
            tp = s.tensor_parallel_size
            weights = pool_needs(cfg, {k: 1})[k].weights
            room = (shares[k] / tp - VLLM_MARGIN) * gpu_gib - weights / tp - RUNTIME_GIB
            fit = math.floor(room / (seq_gib(s) / tp) + 1e-9) if seq_gib(s) else call
            out[k] = max(min(PLAN_SEQS, call), min(call, fit))
    return out


def grow_engines(cfg, actors: dict[str, tuple[int, float]], bins: list[list[str]], gpu_gib: float,
                 share_step: float) -> dict[str, tuple[int, float]]:
    """Give a GPU's unplaced memory to the single-actor vLLM engines on it, split evenly, each up to the KV
    cache of one call's requests (pool batch_size x n sequences): more sequences decoded at once, nothing else
    moves. Engines whose max_num_seqs is set keep their share."""
    grown, call = dict(actors), {}
    for k, s in vllm_samplers(cfg).items():   # sharded engines hold whole GPUs: nothing to grow into
        if not s.max_num_seqs and actors.get(k, (0, 0))[0] == 1 and s.tensor_parallel_size == 1:
            seqs = cfg.pool("sampling", s).batch_size * s.n
            call[k] = sampler_need(s, seqs).total / gpu_gib + VLLM_MARGIN
    for keys in bins:
        engines = sorted({k for k in keys if k in call})
        free = 1.0 - share_step - sum(actors[k][1] for k in keys)   # a step spare: float sums stay <= 1
        for k in engines:
            extra = min(free / len(engines), call[k] - actors[k][1])
            extra = math.floor(extra / share_step + 1e-9) * share_step
            if extra > 0:
                grown[k] = (1, round(actors[k][1] + extra, 3))
    return grown
