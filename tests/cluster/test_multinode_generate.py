"""`synthalign generate` on a real two-node cluster whose worker node has a disk of its own (tests/multinode.py):
the stage actors run on the worker node (its `worker_node` resource), the driver on the head; to an S3 bucket
they write exactly the pairs of a one-node run, also when the worker node is killed mid-run and replaced; a local
output_dir the worker does not see is refused in one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from conftest import tiny_yaml

from cluster.storage import Location, read_table

pytestmark = pytest.mark.slow
N_PROMPTS = 24
# The whole chain in one actor on the worker node (a GPU node group's role): what it writes must reach the head.
ON_WORKER = {"images": {"size": 1, "batch_size": 4, "num_cpus": 0.9, "resources": {"worker_node": 1}}}


@pytest.fixture(scope="module")
def shared_models(tiny_models, ray_nodes) -> dict:
    """The tiny models where both nodes see them (a model hub's role on a real cluster)."""
    dest = ray_nodes["shared"] / "tiny"
    if not dest.exists():
        shutil.copytree(next(iter(tiny_models.values())).parent, dest)
    return {k: dest / v.name for k, v in tiny_models.items()}


def write_config(models: dict, folder, output_dir: str, **sections) -> str:
    return tiny_yaml(models, folder, output_dir, prompts={"num_prompts": N_PROMPTS}, **sections)


def generate(ray_nodes, config: str, *args, wait=True):
    cmd = [sys.executable, "-m", "pipelines.cli", "generate", config, "--address", ray_nodes["gcs"], *args]
    from tests.multinode import base_env
    proc = subprocess.Popen(cmd, cwd=ray_nodes["shared"], env=base_env(ray_nodes["env"]), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def pairs(uri: str):
    files = Location(uri).glob("*.parquet")
    import pyarrow as pa
    t = pa.concat_tables([read_table(f) for f in files])
    return t.drop_columns(["stage_nodes"]).sort_by("pair_id")


def nodes_that_worked(uri: str) -> set[str]:
    ids = set()
    for f in Location(uri).glob("shard-*.parquet"):
        col = read_table(f, ["stage_nodes"]).column("stage_nodes")
        for row in col.to_pylist():
            ids.update(entry.split("=", 1)[1] for entry in row)   # "stage=node_id"
    return ids


@pytest.fixture(scope="module")
def one_node(shared_models, ray_local, tmp_path_factory):
    """The same config on the session's one-node Ray, to a local folder."""
    from pipelines.config import load_config
    from pipelines.generate.job import run_generate
    folder = tmp_path_factory.mktemp("one-node")
    cfg = load_config(write_config(shared_models, folder, str(folder / "run")), [])
    counts = run_generate(cfg)["counts"]
    return pairs(str(folder / "run" / "pairs")), counts


def same_counts(manifest: dict, one: dict) -> bool:
    """The one-node run's counts; a batch redone after a lost node may add skipped duplicates, nothing else."""
    skip = ("duplicates_skipped",)
    return {k: v for k, v in manifest["counts"].items() if k not in skip} == {k: v for k, v in one.items()
                                                                             if k not in skip}


def test_two_nodes_write_exactly_the_one_node_pairs_to_the_bucket(ray_nodes, shared_models, one_node, s3_server,
                                                                  monkeypatch, tmp_path):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    uri = s3_server["bucket"]() + "/run"
    t0 = time.time()
    r = generate(ray_nodes, write_config(shared_models, tmp_path, uri, pools=ON_WORKER))
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"two-node generate: {time.time() - t0:.0f} s")
    assert pairs(f"{uri}/pairs").equals(one_node[0])
    assert nodes_that_worked(f"{uri}/scored") == {ray_nodes["worker_node_id"]()}
    manifest = json.loads(Location(f"{uri}/manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"] == one_node[1]


def test_a_local_folder_the_worker_node_does_not_see_is_refused_in_one_line(ray_nodes, shared_models, tmp_path):
    out = ray_nodes["root"] / "run"
    r = generate(ray_nodes, write_config(shared_models, tmp_path, str(out)))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-4000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("synthalign:")]   # the rest is Ray's log
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ray_nodes["worker_node_id"]()[:12] in errors[0] and "s3://" in errors[0] and str(out) in errors[0]
    assert not (out / "scored").exists() and not (out / "pairs").exists()


def test_a_worker_node_killed_mid_run_changes_nothing_in_the_pairs(ray_nodes, shared_models, one_node, s3_server,
                                                                  monkeypatch, tmp_path):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    uri = s3_server["bucket"]() + "/run"
    proc = generate(ray_nodes, write_config(shared_models, tmp_path, uri, pools=ON_WORKER), wait=False)
    deadline = time.time() + 600
    while not Location(f"{uri}/scored").glob("shard-*.parquet"):   # the stream is under way on both nodes
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-4000:]
        time.sleep(0.5)
    killed = ray_nodes["kill_worker"]()
    time.sleep(3)                            # declared dead first: its actor must be restarted elsewhere
    replacement = ray_nodes["start_worker"]()   # as an autoscaler would bring one
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert killed not in ray_nodes["alive_nodes"]()
    assert nodes_that_worked(f"{uri}/scored") == {killed, replacement}
    assert pairs(f"{uri}/pairs").equals(one_node[0])      # every pair exactly once
    manifest = json.loads(Location(f"{uri}/manifest.json").read_text())
    assert manifest["status"] == "complete" and same_counts(manifest, one_node[1])
    print(f"killed mid-run: {manifest['counts']['duplicates_skipped']} rows redone after the lost node")
