"""Pools pinned to node groups by custom resources really run there: a simulated 3-node Ray cluster.

`ray.cluster_utils.Cluster` starts a head and two worker nodes on this machine, each a real raylet with its
own resources: node A offers `diffusion_node`, node B `sampling_node` and `reward_node` (the names
configs/paper.yaml uses). The real generate job runs on it with the tiny models, and every row's
`stage_nodes` lineage says which node each stage ran on.

Not the session's `ray_local`: this test needs its own cluster, so it shuts any connected Ray down first.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import defaultdict

import pyarrow.dataset as pads
import pytest
from conftest import ROOT, tiny_config

pytestmark = pytest.mark.slow

N_PROMPTS, N_INSTR = 4, 2
# Fractions, not 1: two pools asking for all of a node's `reward_node` would run one after the other.
PINS = {"images": "diffusion_node", "selection": "reward_node", "sampling": "sampling_node",
        "rewards": "reward_node"}


@contextlib.contextmanager
def private_cluster(head_args: dict, nodes: list[dict]):
    """A `ray.cluster_utils.Cluster` of its own, connected; the session's Ray is given back afterwards."""
    import ray
    from ray.cluster_utils import Cluster
    was_connected = ray.is_initialized()
    if was_connected:
        ray.shutdown()
    # Cluster writes its address to <ray temp dir>/ray_current_cluster, which a plain `ray.init()` anywhere
    # on this machine would then join: give this cluster a private temp dir (short: socket paths are
    # limited to ~107 bytes) so concurrent test runs never find it.
    tmp = tempfile.mkdtemp(prefix="sa-pl-", dir="/tmp")
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    # Small object stores; each simulated node still sees the whole machine's memory. No dashboard and no
    # Ray Client server are started. (node_ip_address=127.0.0.1 hangs here: in Ray 2.60 the nodes then look
    # for the GCS at the machine's IP and wait for it forever.)
    common = {"object_store_memory": 150 * 1024 ** 2}
    c = Cluster(initialize_head=True, head_node_args={**common, "include_dashboard": False, **head_args})
    try:
        added = [c.add_node(**common, **n) for n in nodes]
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c, added
    finally:
        ray.shutdown()
        c.shutdown()
        if old_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmpdir
        shutil.rmtree(tmp, ignore_errors=True)
        if was_connected:  # give later tests the session Ray back (same arguments as conftest's ray_local)
            from cluster.connect import local_system_config
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     _system_config=local_system_config(2))


@pytest.fixture(scope="module")
def cluster():
    with private_cluster({"num_cpus": 1}, [{"num_cpus": 2, "resources": {"diffusion_node": 1}},
                                            {"num_cpus": 2, "resources": {"sampling_node": 1, "reward_node": 1}}]) \
            as (c, (node_a, node_b)):
        yield {"head": c.head_node.node_id, "A": node_a.node_id, "B": node_b.node_id}


def test_each_stage_runs_on_its_node_group(cluster, tiny_models, tmp_path):
    import ray

    from pipelines.generate.job import run_generate
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert nodes[cluster["A"]].get("diffusion_node") == 1 and "sampling_node" not in nodes[cluster["A"]]
    assert nodes[cluster["B"]].get("reward_node") == 1 and nodes[cluster["B"]].get("sampling_node") == 1

    pins = {f"pools.{stage}.resources": f"{{{res}: 0.1}}" for stage, res in PINS.items()}
    cfg = tiny_config(tiny_models, tmp_path / "run", **{"prompts.num_prompts": N_PROMPTS, "fuse": "false",
                                                       "prompts.instructions_per_prompt": N_INSTR, **pins})
    assert cfg.pool("images").resources == {"diffusion_node": 0.1}
    manifest = run_generate(cfg)

    # Complete: every image-question is a pair or a counted drop, none failed.
    c = manifest["counts"]
    assert c["questions"] == N_PROMPTS * N_INSTR and c["errors"] == 0
    assert c["pairs"] + sum(c["dropped"].values()) == N_PROMPTS * N_INSTR
    pairs = pads.dataset(str(tmp_path / "run" / "pairs"), format="parquet").to_table(
        columns=["pair_id", "stage_nodes"]).to_pylist()
    assert len(pairs) == c["pairs"] > 0

    want = {"images": cluster["A"], "selection": cluster["B"], "rewards": cluster["B"]}
    want.update({f"sampling:{s.label}": cluster["B"] for s in cfg.samplers})
    seen = defaultdict(set)
    for row in pairs:
        tags = dict(t.split("=", 1) for t in row["stage_nodes"])
        assert set(tags) == set(want) and len(row["stage_nodes"]) == len(want), row["stage_nodes"]
        for stage, node in tags.items():
            seen[stage].add(node)
    assert {stage: nodes_ for stage, nodes_ in seen.items()} == {stage: {node} for stage, node in want.items()}
    assert cluster["head"] not in set().union(*seen.values())


def test_paper_1node_pools_all_start_on_one_8_gpu_node(tmp_path):
    """configs/paper-1node.yaml at full pool size on a node declaring 8 GPUs and no custom resources: every actor
    of the generate chain starts and every row passes every pool (the GPU stages are the cluster simulation's
    sleep stand-ins with the real classes' columns)."""
    from concurrent.futures import ThreadPoolExecutor

    from actors.prompts import load_prompts
    from actors.rewards import load_vocab
    from pipelines.bench.sim import SIM_ENV, SIM_STAGES
    from pipelines.config import load_config
    from pipelines.generate.chain import build_pipeline, prompt_table
    from pipelines.generate.job import write_scored
    cfg = load_config(ROOT / "configs" / "paper-1node.yaml", [f"output_dir={tmp_path / 'run'}",
                                                              "prompts.num_prompts=16"])
    pools = cfg.running_pools()
    assert sum(p.size * p.num_gpus for p in pools.values()) <= 8 and not any(p.resources for p in pools.values())
    (tmp_path / "log").mkdir()
    os.environ[SIM_ENV] = json.dumps({"per_item": dict.fromkeys(pools, 0.001), "log_dir": str(tmp_path / "log"),
                                      "image_bytes": 1024})   # the raylet and its workers inherit it
    try:
        with private_cluster({"num_cpus": 16, "num_gpus": 8}, []):
            ds = build_pipeline(cfg, prompt_table(load_prompts(cfg.prompts)), load_vocab(cfg.rewards), swap=SIM_STAGES)
            with ThreadPoolExecutor(1) as pool:   # a pool that finds no room waits forever: bound it
                pool.submit(write_scored, ds, tmp_path / "run" / "scored", cfg.rows_per_shard).result(timeout=600)
    finally:
        os.environ.pop(SIM_ENV, None)
    rows = pads.dataset(str(tmp_path / "run" / "scored"), format="parquet").to_table().to_pylist()
    assert len(rows) == 16 and all(r["error"] is None for r in rows)
    started = {f.stem.rsplit("-", 1)[0] for f in (tmp_path / "log").glob("*.jsonl")}   # <pool>-<pid>.jsonl
    assert started == {k.replace(":", "_") for k in pools}
    actors = {f.stem for f in (tmp_path / "log").glob("images-*.jsonl")}
    assert len(actors) >= 2   # the images pool ran on several of its 6 actors


def test_a_config_whose_pools_cannot_all_be_placed_fails_at_load():
    from actors.common.errors import InputError
    from pipelines.config import load_config
    with pytest.raises(InputError, match=r"field 'pools': ask for 12.25 GPUs at once \(images 4 \+ .*\) but the "
                                         r"cluster has 8"):
        load_config(ROOT / "configs" / "paper.yaml", ["cluster.gpus_per_node=8"])
    with pytest.raises(InputError, match="no node offers diffusion_node"):
        load_config(ROOT / "configs" / "paper.yaml", ["cluster.gpus_per_node=16"])
