"""The chaos soak at a small size: a two-node local cluster, pool actors and the worker node's raylet killed, the
driver killed and the run resumed; the pairs are those of a fault-free run, none lost, none twice."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_small_soak_loses_and_duplicates_no_pair(tiny_models, tmp_path):
    from benchmarks.chaos import bench_chaos
    from benchmarks.suite import chaos_rows
    tiny = tiny_models["sd"].parent   # the session's tiny models (make_tiny reuses complete folders)
    # 600 prompts: ~19 blocks of 32 (the fused chain's), enough shards apart for six faults
    r = bench_chaos(tmp_path, tiny, prompts=600, faults=6, seed=3, timeout_s=1500)
    kinds = r["faults_by_kind"]
    assert r["faults_planned"] == 6 and r["faults_injected"] >= 5, r["faults"]
    assert kinds["actor"] >= 1 and kinds["driver"] == 1, r["faults"]
    assert r["invocations"] >= 2 and r["prompts_resumed"] > 0   # the driver kill was resumed by the same command
    assert r["survived"] and r["errors"] == r["reference_errors"]   # the same rows quarantined (an empty answer)
    assert r["lost"] == 0 and r["duplicated"] == 0 and r["extra"] == 0
    assert r["pairs"] == r["reference_pairs"] > 0
    # Every pair's columns (but the node ids) as the fault-free run's: images, answers, which answer was chosen
    # byte for byte; scores to float rounding (a resumed run cuts its remaining prompts into other batches).
    assert r["differing_beyond_rounding"] == 0, r["differing_columns"]
    assert set(r["differing_columns"]) <= {"chosen_reward", "rejected_reward", "margin", "image_score",
                                           "candidate_scores"}
    rows = chaos_rows(r)
    print("\n".join(f"{row[1]}: {row[2]}" for row in rows))   # the soak's figures (pytest -rP shows them)
    assert [row[4] for row in rows if row[4] is not None] == [True, True]   # the two targets: lost, duplicated
