"""The shipped cluster configs parse, have the expected shape, and can host every shipped run config.

For each cluster config (launcher YAML, KubeRay RayCluster, KubeRay RayJob) the node groups are read as
{resource: amount per node} plus a node count; each run config (configs/*.yaml, loaded the way the CLI
loads it) is turned into actor demands (pools, one per sampler, and the Ray Train workers). A demand that
names custom resources must fit on one node of a group offering them (CPU, GPU and custom amounts), and the
groups' maximum size must cover the sum of what is pinned to them.
"""
from __future__ import annotations

import json
import re
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
import ray
import yaml
from conftest import ROOT
from packaging.specifiers import SpecifierSet

CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
CLUSTER_YAMLS = sorted(CLUSTER.rglob("*.yaml"))
RUN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
NODE_GROUPS = {"diffusion_node", "sampling_node", "reward_node", "train_node"}


def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path}: one document expected"
    return docs[0]


def cpu_quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


# --- node groups: name -> ({resource: per node}, max nodes) ------------------------------------------------

def launcher_groups(cfg: dict) -> tuple[dict, dict]:
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["resources"]
    workers = {name: (dict(t["resources"]), t.get("max_workers", 0))
               for name, t in types.items() if name != cfg["head_node_type"]}
    return head, workers


def kuberay_group(spec: dict) -> dict:
    params = spec.get("rayStartParams", {})
    res = {}
    if "resources" in params:
        # KubeRay's format: a JSON object inside a quoted string, '"{\"name\": 1}"'.
        res.update(json.loads(params["resources"].strip().strip("'").strip('"').replace('\\"', '"')))
    limits = spec["template"]["spec"]["containers"][0]["resources"]["limits"]
    res["CPU"] = float(params["num-cpus"]) if "num-cpus" in params else cpu_quantity(limits["cpu"])
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    if float(gpus):
        res["GPU"] = float(gpus)
    return res


def kuberay_cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def groups_of(path: Path) -> tuple[dict, dict]:
    doc = load(path)
    if "available_node_types" in doc:
        return launcher_groups(doc)
    spec = kuberay_cluster_spec(doc)
    head = kuberay_group(spec["headGroupSpec"])
    return head, {g["groupName"]: (kuberay_group(g), g["maxReplicas"]) for g in spec["workerGroupSpecs"]}


# --- what a run config asks for -----------------------------------------------------------------------------

def demands(cfg) -> list[tuple[str, dict, int]]:
    """(what, resources per actor, how many actors at most)."""
    out = []

    def pool(label, p):
        per = {"CPU": p.num_cpus, **p.resources}
        if p.num_gpus:
            per["GPU"] = p.num_gpus
        out.append((label, per, p.max_size or p.size))

    pool("images", cfg.pool("images"))
    pool("selection", cfg.pool("selection"))
    for s in cfg.samplers:
        pool(f"sampling:{s.label}", cfg.pool("sampling", s))
    pool("rewards", cfg.pool("rewards"))
    w = cfg.train.workers
    per = {"CPU": w.num_cpus, **w.resources}
    if w.use_gpu:
        per["GPU"] = w.num_gpus or 1.0
    out.append(("train.workers", per, w.num_workers))
    return out


def _load_config(path: Path):
    from pipelines.config import load_config
    return load_config(path)


def fits(per: dict, node: dict) -> bool:
    return all(node.get(r, 0) >= amount for r, amount in per.items() if amount)


@pytest.mark.parametrize("run_config", RUN_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("cluster_yaml", CLUSTER_YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_requested_resource_is_offered(cluster_yaml, run_config):
    from pipelines.config import load_config
    cfg = load_config(run_config)
    head, groups = groups_of(cluster_yaml)
    pinned = defaultdict(lambda: defaultdict(float))  # group -> resource -> total demand
    for what, per, count in demands(cfg):
        custom = {r for r in per if r not in ("CPU", "GPU")}
        if not custom:
            assert any(fits(per, node) for node, _ in [(head, 0), *groups.values()]), f"{what}: {per}"
            continue
        assert not custom & set(head), f"{cluster_yaml.name}: the head must not offer {custom & set(head)}"
        hosts = [name for name, (node, _) in groups.items() if fits(per, node)]
        assert hosts, (f"{run_config.name} {what} asks for {per} per actor; no group of {cluster_yaml.name} "
                       f"offers that on one node: {groups}")
        if len(hosts) == 1:
            for r, amount in per.items():
                pinned[hosts[0]][r] += amount * count
    for name, totals in pinned.items():
        node, max_nodes = groups[name]
        for r, total in totals.items():
            assert total <= node.get(r, 0) * max_nodes + 1e-9, (
                f"{run_config.name}: group {name} of {cluster_yaml.name} needs {total} {r} in all, offers "
                f"{node.get(r, 0)} x {max_nodes} nodes")


def test_paper_pools_are_pinned_to_gpu_groups():
    """The check above is only as strong as the configs' pins: the GPU recipes do pin every pool."""
    from pipelines.config import load_config
    for name in ("paper.yaml", "pairs-2k.yaml", "pairs-9k.yaml"):
        for what, per, _ in demands(load_config(ROOT / "configs" / name)):
            assert set(per) & NODE_GROUPS and per.get("GPU"), f"{name} {what}: {per}"


def test_launcher_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = load(LAUNCHER)
    validate_config(prepare_config(raw))  # what `ray up` does before launching anything
    head, groups = launcher_groups(raw)
    assert not {"GPU", *NODE_GROUPS} & set(head), "CPU head"
    assert {r for node, _ in groups.values() for r in node} >= NODE_GROUPS
    assert all(node.get("GPU", 0) > 0 for node, _ in groups.values())
    assert raw["max_workers"] >= sum(n for _, n in groups.values())
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")   # the client's Ray
    # The nodes install this project with the extra the GPU configs need (vllm backends), and a torch the
    # project's own range allows.
    setup = " && ".join(raw["setup_commands"])
    assert "pip install -q -e" in setup
    if any(s.backend == "vllm" for c in RUN_CONFIGS for s in _load_config(c).samplers):
        assert "[vllm]" in setup
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_range = SpecifierSet(next(d for d in deps if d.startswith("torch"))[len("torch"):])
    pinned = re.search(r"torch==([\w.]+)", setup)
    assert pinned and pinned.group(1) in torch_range, (pinned, torch_range)
    # Security properties, not values: the token file goes to every node, every `ray start` asks for token mode,
    # the dashboard (Jobs API) listens on loopback only.
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmd in raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in cmd
    assert "--dashboard-host=127.0.0.1" in raw["head_start_ray_commands"][-1]
    assert any("RAY_AUTH_MODE=token" in o for o in raw["docker"]["run_options"])


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifests(path):
    doc = load(path)
    # ray.io/v1 is the KubeRay operator's API (v1alpha1 is gone); the rest are properties, not copied values:
    # token auth on, the head's service inside the cluster only, the client's Ray version everywhere.
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == {RAYCLUSTER: "RayCluster", RAYJOB: "RayJob"}[path]
    spec = kuberay_cluster_spec(doc)
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    head, groups = groups_of(path)
    assert not {"GPU", *NODE_GROUPS} & set(head)
    assert {r for node, _ in groups.values() for r in node} >= NODE_GROUPS
    for name, g in ((g["groupName"], g) for g in spec["workerGroupSpecs"]):
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], name
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and ray.__version__ in images.pop()
    if doc["kind"] == "RayJob":
        assert "synthalign " in doc["spec"]["entrypoint"] and doc["spec"]["shutdownAfterJobFinishes"] is True
        runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert "RAY_AUTH_TOKEN" not in runtime_env.get("env_vars", {})
        # Same node groups as the standalone RayCluster, so one config check covers both.
        assert groups_of(RAYJOB) == groups_of(RAYCLUSTER)
