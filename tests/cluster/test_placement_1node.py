"""configs/paper-1node.yaml on one node that declares 8 GPUs: every pool of the generate chain starts.

A module of its own: `private_cluster` gives the session's local Ray back when it ends, which it cannot do from
inside another private cluster (test_placement.py's module fixture)."""
from __future__ import annotations

import json
import os

import pyarrow.dataset as pads
import pytest
from conftest import ROOT, private_cluster

pytestmark = pytest.mark.slow


def test_paper_1node_pools_all_start_on_one_8_gpu_node(tmp_path):
    """configs/paper-1node.yaml at full pool size on a node declaring 8 GPUs and no custom resources: every actor
    of the generate chain starts and every row passes every pool (the GPU stages are the cluster simulation's
    sleep stand-ins with the real classes' columns)."""
    from concurrent.futures import ThreadPoolExecutor

    from actors.prompts import load_prompts
    from actors.rewards import load_vocab
    from benchmarks.sim import SIM_ENV, SIM_STAGES
    from pipelines.config import load_config
    from pipelines.generate.chain import build_pipeline, prompt_table
    from pipelines.generate.job import write_scored
    cfg = load_config(ROOT / "configs" / "paper-1node.yaml", [f"output_dir={tmp_path / 'run'}",
                                                              "prompts.num_prompts=16"])
    pools = cfg.running_pools()
    assert sum(p.size * p.num_gpus for p in pools.values()) <= 8 and not any(p.resources for p in pools.values())
    (tmp_path / "log").mkdir()
    # images batches of ~1.6 s: long enough that a second actor is up before the first has taken all 4 (the
    # pool's CPUs do not all fit, so not every actor starts at once)
    per_item = {k: 0.1 if k == "images" else 0.005 for k in pools}
    os.environ[SIM_ENV] = json.dumps({"per_item": per_item, "log_dir": str(tmp_path / "log"),
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
