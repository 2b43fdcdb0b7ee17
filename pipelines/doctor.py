"""`synthalign doctor [CONFIG]`: what a user runs first on a new cluster. Every node is probed (cluster/doctor.py);
this module holds what a config asks of them and says, one line each, where the cluster falls short."""
from __future__ import annotations

import os
import re
from pathlib import Path

from actors.common.errors import Problem
from cluster.doctor import NodeFacts, probe_nodes

# Model-naming config keys (the last part of a dotted key).
MODEL_KEYS = {"model", "text_model", "clip_model", "judge_model", "adapter"}
# Hub repositories that need an accepted licence and a token to download.
GATED_PREFIXES = ("stabilityai/stable-diffusion-3", "meta-llama/", "black-forest-labs/FLUX.1-dev")
# Names the loaders map to hub repositories themselves (actors/common/imagereward.py).
HUB_ALIASES = {"ImageReward-v1.0": "THUDM/ImageReward"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _flat(value, key: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _flat(v, f"{key}[{i}]")
    else:
        yield key, value


def model_refs(cfg) -> tuple[dict[str, str], dict[str, str]]:
    """({config key: absolute local path}, {config key: hub id}) the config loads. Paths the run builds itself
    (`tiny_models`) are left out."""
    built = Path(cfg.tiny_models).resolve() if cfg.tiny_models else None
    paths, ids = {}, {}
    for key, value in _flat(cfg.to_dict()):
        if key.split(".")[-1].split("[")[0] not in MODEL_KEYS or not isinstance(value, str) or not value:
            continue
        value = HUB_ALIASES.get(value, value)
        local = Path(value).expanduser()
        if local.exists() or value.startswith((".", "/", "~")) or not HUB_ID.match(value):
            local = local.resolve()
            if built is None or not local.is_relative_to(built):
                paths[key] = str(local)
        else:
            ids[key] = value
    return paths, ids


def _hf_token() -> bool:
    from huggingface_hub import get_token
    return bool(get_token())


def _hub_reachable(repo: str) -> str | None:
    """None when the Hub answers for `repo`, else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import HfApi
        HfApi().model_info(repo, timeout=10)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def version_problems(nodes: list[NodeFacts]) -> list[Problem]:
    errs = []
    columns = {"python": lambda n: n.python, **{p: (lambda n, p=p: n.packages.get(p)) for p in nodes[0].packages}}
    for name, get in columns.items():
        seen: dict[str, list[str]] = {}
        for n in nodes:
            seen.setdefault(str(get(n)), []).append(n.address)
        if len(seen) > 1:
            errs.append(Problem("nodes", f"{name} differs across nodes: " +
                                "; ".join(f"{v} on {', '.join(a)}" for v, a in seen.items())))
    for n in nodes:
        if n.ray_gpus and not n.gpus:
            errs.append(Problem("nodes", f"node {n.name}: Ray offers {n.ray_gpus:g} GPU(s) but torch sees none "
                                         f"(torch {n.packages.get('torch')}, CUDA build {n.cuda}): install a CUDA torch"))
    return errs


def gpu_problems(cfg, nodes: list[NodeFacts]) -> list[Problem]:
    """Generation's pools run at once; training's worker group runs alone."""
    errs = []
    total, biggest = sum(n.ray_gpus for n in nodes), max((n.ray_gpus for n in nodes), default=0.0)
    offered = set().union(*(n.resources for n in nodes)) if nodes else set()
    pools = cfg.running_pools()
    want = {name: p.size * p.num_gpus for name, p in pools.items() if p.num_gpus}
    if sum(want.values()) > total:
        parts = " + ".join(f"{k} {v:g}" for k, v in want.items())
        errs.append(Problem("pools", f"ask for {sum(want.values()):g} GPUs at once ({parts}); the cluster has {total:g}"))
    groups = [(f"pools.{k}", p.num_gpus, p.resources) for k, p in pools.items()]
    w = cfg.train.workers
    groups.append(("train.workers", (w.num_gpus or 1.0) if w.use_gpu else 0.0, w.resources))
    if w.use_gpu and w.num_workers * (w.num_gpus or 1.0) > total:
        errs.append(Problem("train.workers", f"{w.num_workers} GPU worker(s) but the cluster has {total:g} GPUs"))
    for key, gpus, resources in groups:
        if biggest and gpus > biggest:   # no GPU at all is the total's problem above
            errs.append(Problem(f"{key}.num_gpus", f"{gpus:g} GPU(s) per actor; the largest node offers {biggest:g}"))
        missing = sorted(set(resources) - offered)
        if missing:
            errs.append(Problem(f"{key}.resources", f"no node offers {', '.join(missing)}"))
    if any(s.backend == "vllm" for s in cfg.samplers):
        where = [n for n in nodes if n.ray_gpus] or nodes
        lacking = [n.address for n in where if not n.packages.get("vllm")]
        if lacking:
            errs.append(Problem("samplers", f"backend vllm, but vllm is not installed on {', '.join(lacking)} "
                                            "(pip install '.[vllm]')"))
    return errs


def model_problems(paths: dict[str, str], ids: dict[str, str], nodes: list[NodeFacts]) -> list[Problem]:
    errs = []
    for n in nodes:
        errs += [Problem(key, f"{p} does not exist on node {n.name}") for key, p in paths.items()
                 if p in n.missing_paths]
    token = _hf_token()
    for key, repo in ids.items():
        if repo.startswith(GATED_PREFIXES) and not token:
            errs.append(Problem(key, f"{repo} is gated: set HF_TOKEN (after accepting its licence on the Hub)"))
        uncached = [n.address for n in nodes if repo in n.uncached_ids]
        if uncached:
            why = _hub_reachable(repo)
            if why:
                errs.append(Problem(key, f"{repo} is not in the Hugging Face cache of {', '.join(uncached)} and the "
                                         f"Hub does not answer ({why})"))
    return errs


def storage_problems(output_dir: str, nodes: list[NodeFacts]) -> list[Problem]:
    from actors.common.errors import InputError
    from cluster.storage import Location, check_everywhere
    errs = [Problem("output_dir", f"node {n.name} cannot write {output_dir}: {n.write_error}")
            for n in nodes if n.write_error]
    if not errs:
        try:
            check_everywhere(Location(output_dir))
        except InputError as e:
            errs.append(Problem("output_dir", str(e)))
    return errs


def diagnose(cfg=None) -> tuple[list[NodeFacts], list[Problem]]:
    """Probe every node for `cfg` (or only the cluster's own consistency without one). Needs a connected Ray."""
    paths, ids = model_refs(cfg) if cfg else ({}, {})
    output_dir = None
    if cfg:
        from cluster.storage import is_uri
        output_dir = cfg.output_dir if is_uri(cfg.output_dir) else str(Path(cfg.output_dir).resolve())
    nodes = probe_nodes(sorted(set(paths.values())), sorted(set(ids.values())), output_dir)
    errs = version_problems(nodes)
    if cfg:
        errs += gpu_problems(cfg, nodes) + model_problems(paths, ids, nodes) + storage_problems(output_dir, nodes)
    return nodes, errs


def describe(nodes: list[NodeFacts]) -> list[str]:
    """A line per node, what a user reads first."""
    lines = []
    for n in nodes:
        pk = n.packages
        gpus = ", ".join(f"{g} {m:g} GB" for g, m in zip(n.gpus, n.gpu_memory_gb)) or "none"
        lines.append(f"node {n.name}: python {n.python}, torch {pk.get('torch')} (CUDA {n.cuda or '-'}, "
                     f"NCCL {n.nccl or '-'}), transformers {pk.get('transformers')}, vllm {pk.get('vllm') or '-'}, "
                     f"ray GPUs {n.ray_gpus:g}, devices: {gpus}")
    lines.append(f"Hugging Face token: {'present' if _hf_token() else 'absent'}")
    return lines
