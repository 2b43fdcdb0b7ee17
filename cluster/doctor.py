"""What every node of a Ray cluster has: versions, GPUs, which model paths it sees, whether it can write the
run's output. One probe task pinned to each alive node; the driver compares the answers (pipelines/doctor.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# Packages whose versions must agree across nodes: a worker group or a pool spread over nodes with different
# torch or transformers builds fails in ways that name neither.
PACKAGES = ("torch", "transformers", "diffusers", "trl", "peft", "deepspeed", "ray", "pyarrow", "vllm")


@dataclass
class NodeFacts:
    node_id: str
    address: str
    python: str
    packages: dict[str, str | None]
    cuda: str | None                      # torch's CUDA build, None for a CPU build
    nccl: str | None
    gpus: list[str] = field(default_factory=list)      # device names torch sees
    gpu_memory_gb: list[float] = field(default_factory=list)
    ray_gpus: float = 0.0                 # what Ray schedules on this node
    resources: dict[str, float] = field(default_factory=dict)
    missing_paths: list[str] = field(default_factory=list)
    uncached_ids: list[str] = field(default_factory=list)
    write_error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.address} ({self.node_id[:12]})"


def installed_versions(names) -> dict[str, str | None]:
    """{name: installed version, None when the package is not installed}."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _cached(repo_id: str) -> bool:
    """A Hugging Face id already in this node's cache (no network needed to load it)."""
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:
        return False


def probe(paths: list[str], hub_ids: list[str], output_dir: str | None) -> dict:
    """Runs on one node: what it has and sees. Heavy imports here, on the node."""
    import platform
    import uuid

    import torch
    out = {"python": platform.python_version(), "packages": installed_versions(PACKAGES),
           "cuda": torch.version.cuda, "nccl": None, "gpus": [], "gpu_memory_gb": []}
    if torch.cuda.is_available():
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out["gpus"].append(props.name)
            out["gpu_memory_gb"].append(round(props.total_memory / 2**30, 1))
    out["missing_paths"] = [p for p in paths if not os.path.exists(p)]
    out["uncached_ids"] = [r for r in hub_ids if not _cached(r)]
    out["write_error"] = None
    if output_dir:
        from cluster.storage import Location
        try:
            loc = Location(output_dir).mkdir() / f".doctor-{uuid.uuid4().hex[:12]}"
            loc.write_text("ok")
            if loc.read_text() != "ok":
                raise OSError("read back something else")
            loc.unlink()
        except Exception as e:  # any failure is the answer: permissions, a missing mount, missing credentials
            out["write_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return out


def probe_nodes(paths: list[str] = (), hub_ids: list[str] = (), output_dir: str | None = None,
                timeout: float = 300.0) -> list[NodeFacts]:
    """One probe per alive node (pinned, no retries), in node order."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(probe)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(list(paths), list(hub_ids), output_dir) for n in nodes]
    facts = []
    for node, answer in zip(nodes, ray.get(refs, timeout=timeout)):
        resources = dict(node.get("Resources", {}))
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
                  and not k.startswith(("node:", "accelerator_type:"))}
        facts.append(NodeFacts(node_id=node["NodeID"], address=node["NodeManagerAddress"],
                               ray_gpus=resources.get("GPU", 0.0), resources=custom, **answer))
    return facts
