"""`synthalign bench` at toy sizes: every key is there and every value is sane. No timing asserts: timings on
shared 2-core machines say nothing; BENCHMARKS.md holds a full run."""
from __future__ import annotations

import json
import math

import pytest


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def results(tiny_models, ray_local, tmp_path_factory):
    from pipelines.bench.suite import run_bench
    out = tmp_path_factory.mktemp("bench")
    tiny = tiny_models["sd"].parent  # the session's tiny models (make_tiny reuses complete folders)
    return out, run_bench(out, only=("streaming", "cluster"), tiny=tiny, prompts=8,
                          sim={"prompts": 24, "scale": 0.002, "gpus": 8})


def test_streaming_keys_and_values(results):
    _, r = results
    s = r["streaming"]
    for key in ("loop_seconds", "pipeline_seconds", "loop_prompts_per_s", "pipeline_prompts_per_s", "ratio",
                "loop_cpu_seconds", "pipeline_cpu_seconds"):
        assert _number(s[key]) and s[key] > 0, key
    assert s["prompts"] == 8
    assert s["ratio"] == pytest.approx(s["loop_seconds"] / s["pipeline_seconds"], rel=0.01)
    # the loop and the pipeline computed the same pairs, image bytes included
    assert s["pairs"] == s["loop_pairs"] > 0 and s["same_pairs"] is True


def test_cluster_simulation_busy_fractions(results):
    _, r = results
    sim = r["cluster"]["balanced"]
    from conftest import ROOT

    from pipelines.bench.sim import sim_costs
    from pipelines.config import load_config
    cfg = load_config(ROOT / "configs" / sim["config"], ["output_dir=x"])
    assert set(sim["pools"]) == set(sim_costs(cfg)) == {"images", "selection", "rewards"} | {
        f"sampling:{s.label}" for s in cfg.samplers}
    for name, pool in sim["pools"].items():
        assert 0.0 <= pool["busy"] <= 1.0, name
        assert pool["gpus"] > 0 and pool["actors"] >= 1 and pool["window_s"] > 0
    assert sim["gpus_total"] <= 8 and sim["min_busy"] == min(p["busy"] for p in sim["pools"].values())
    assert sim["predicted_hours"] >= sim["ideal_hours"] > 0
    assert sim["predict_prompts"] == cfg.prompts.num_prompts


def test_writes_json_and_markdown(results):
    out, r = results
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(r))
    md = (out / "results.md").read_text()
    assert "| streaming |" in md and "| cluster |" in md
    assert r["machine"]["cores"] >= 1 and len(r["machine"]["load_avg_start"]) == 3


def test_cli_rejects_an_unknown_benchmark(tmp_path):
    from pipelines.cli import main
    assert main(["bench", "--out", str(tmp_path), "--only", "streaming,nope"]) == 2


def test_balanced_shape_keeps_up_with_diffusion():
    from conftest import ROOT

    from pipelines.bench.sim import sim_costs, sim_shape
    from pipelines.config import load_config
    cfg = load_config(ROOT / "configs" / "pairs-9k.yaml", ["output_dir=x"])
    shape, cost = sim_shape(cfg, gpus=8), sim_costs(cfg)
    assert shape["images"] == int(shape["images"]) >= 1 and sum(shape.values()) <= 8
    rate = shape["images"] / (cost["images"][0] * cost["images"][1])  # prompts per second
    for key, gpus in shape.items():
        assert gpus / (cost[key][0] * cost[key][1]) >= rate * 0.999, key


def test_scale_bench_pairs_are_incompressible_at_the_asked_size(tmp_path):
    import io

    import pyarrow.dataset as pads
    from PIL import Image

    from pipelines.bench.scale import write_noise_pairs
    from pipelines.train.data import parquet_files
    folder = write_noise_pairs(tmp_path / "p", n=5, px=64, rows_per_file=2)
    assert len(parquet_files(str(folder))) == 3
    rows = pads.dataset(str(folder)).to_table().to_pylist()
    assert [r["pair_id"] for r in rows] == [f"p{i:07d}" for i in range(5)]
    assert all(Image.open(io.BytesIO(r["image"])).size == (64, 64) for r in rows)
    assert min(len(r["image"]) for r in rows) > 64 * 64 * 3 * 0.95   # noise: PNG cannot shrink it
