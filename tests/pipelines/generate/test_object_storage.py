"""A run whose output_dir is an S3 URI (a local S3-compatible server): every part of the folder lands in the bucket,
the pairs are those of a local run, a rerun resumes from the bucket, `--overwrite` clears stale parts there,
and `export` / `report` read from the URI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_yaml

from cluster.storage import Location

pytestmark = pytest.mark.slow
N_PROMPTS = 4


def run_config(tiny: dict, folder, output_dir: str, **extra) -> str:
    return tiny_yaml(tiny, folder, output_dir, **{"prompts": {"num_prompts": N_PROMPTS}, **extra})


def cli(args: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env={**full, **env},
                          capture_output=True, text=True, timeout=600)


def pairs_table(where: str) -> pa.Table:
    """The pairs view sorted by pair_id, without `stage_nodes` (which node ran a stage differs by run)."""
    loc = Location(where)
    files = loc.glob("*.parquet")
    t = pa.concat_tables([pq.read_table(f.path, filesystem=f.fs) for f in files])
    t = t.drop_columns([c for c in ("stage_nodes",) if c in t.column_names])
    return t.sort_by("pair_id")


@pytest.fixture(scope="module")
def local_run(tiny_models, ray_local, tmp_path_factory):
    """The same config run locally in this process: the pairs an S3 run must reproduce."""
    from pipelines.config import load_config
    from pipelines.generate.job import run_generate
    folder = tmp_path_factory.mktemp("local")
    cfg = load_config(run_config(tiny_models, folder, str(folder / "run")), [])
    manifest = run_generate(cfg)
    return cfg.output_dir, manifest


def test_generate_to_s3_writes_every_part_in_the_bucket_and_matches_a_local_run(
        tiny_models, local_run, s3_server, bucket, tmp_path, monkeypatch):
    env = s3_server["env"]
    for k, v in env.items():   # this process reads the bucket back with the same standard variables
        monkeypatch.setenv(k, v)
    uri = f"{bucket}/runs/tiny"
    config = run_config(tiny_models, tmp_path, uri)
    r = cli(["generate", config], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"-> {uri}/pairs" in r.stdout
    root = Location(uri)
    names = {f.name for f in root.glob("*")}
    assert {"scored", "pairs", "candidates", ".views", "manifest.json"} <= names, names   # errors: none failed
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["questions"] == N_PROMPTS * 2
    assert manifest["counts"] == {**local_run[1]["counts"], **{k: manifest["counts"][k] for k in ("prompts_resumed",)}}
    assert not [f for f in (root / "scored").glob("*") if not f.name.startswith("shard-")]   # no temporaries
    assert pairs_table(f"{uri}/pairs").equals(pairs_table(f"{local_run[0]}/pairs"))

    # A rerun resumes from the bucket: every prompt is done, nothing is rendered, the views are unchanged.
    before = {f.name: f.read_bytes() for f in (root / "pairs").glob("*")}
    r = cli(["generate", config], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((root / "manifest.json").read_text())["counts"]
    assert again["prompts_resumed"] == N_PROMPTS and again["images_rendered"] == 0
    assert {f.name: f.read_bytes() for f in (root / "pairs").glob("*")} == before

    # export and report read the URI
    r = cli(["export", uri, "--out", str(tmp_path / "llava")], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads((tmp_path / "llava" / "pairs.json").read_text())) == manifest["counts"]["pairs"]
    r = cli(["report", uri], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (root / "report.md").read_text().startswith(f"# SynthAlign run report: `{uri}`")
    assert (root / "report" / "rewards.png").read_bytes()[:4] == b"\x89PNG"

    # A changed generation key: refused in one line, then cleared in the bucket with --overwrite.
    changed = run_config(tiny_models, tmp_path, uri, pairs={"min_margin": 0.5})
    r = cli(["generate", changed], env, tmp_path)
    assert r.returncode == 2 and "changed: pairs.min_margin" in r.stderr and "Traceback" not in r.stderr
    r = cli(["generate", changed, "--overwrite"], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((root / "manifest.json").read_text())
    assert m["counts"]["prompts_resumed"] == 0 and m["config"]["pairs"]["min_margin"] == 0.5
    assert not (root / "report.md").exists()


def test_a_bucket_that_does_not_exist_is_one_line_before_ray_starts(tiny_models, s3_server, tmp_path):
    config = run_config(tiny_models, tmp_path, "s3://no-such-bucket-here/run")
    r = cli(["generate", config], s3_server["env"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and "s3://no-such-bucket-here/run" in r.stderr and "not writable" in r.stderr
