"""Pools pinned to node groups by custom resources really run there: a simulated 3-node Ray cluster.

`ray.cluster_utils.Cluster` starts a head and two worker nodes on this machine, each a real raylet with its
own resources: node A offers `diffusion_node`, node B `sampling_node` and `reward_node` (the names
configs/paper.yaml uses). The real generate job runs on it with the tiny models, and every row's
`stage_nodes` lineage says which node each stage ran on.

Not the session's `ray_local`: this test needs its own cluster, so it shuts any connected Ray down first.
"""
from __future__ import annotations

from collections import defaultdict

import pyarrow.dataset as pads
import pytest
from conftest import ROOT, private_cluster, tiny_config

pytestmark = pytest.mark.slow

N_PROMPTS, N_INSTR = 4, 2
# Fractions, not 1: two pools asking for all of a node's `reward_node` would run one after the other.
PINS = {"images": "diffusion_node", "selection": "reward_node", "sampling": "sampling_node",
        "rewards": "reward_node"}


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


def test_a_config_whose_pools_cannot_all_be_placed_fails_at_load():
    from actors.common.errors import InputError
    from pipelines.config import load_config
    with pytest.raises(InputError, match=r"field 'pools': ask for 12.25 GPUs at once \(images 4 \+ .*\) but the "
                                         r"cluster has 8"):
        load_config(ROOT / "configs" / "paper.yaml", ["cluster.gpus_per_node=8"])
    with pytest.raises(InputError, match="no node offers diffusion_node"):
        load_config(ROOT / "configs" / "paper.yaml", ["cluster.gpus_per_node=16"])
