"""`synthalign generate` on a real two-node cluster whose worker node has a disk of its own (tests/multinode.py):
the stage actors run on the worker node (its `worker_node` resource), the driver on the head; to an S3 bucket
they write exactly the pairs of a one-node run, also when the worker node is killed mid-run and replaced; a local
output_dir the worker does not see is refused in one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_yaml

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


def submit(ray_nodes, workdir, config: str, *args) -> subprocess.CompletedProcess:
    """`synthalign submit CONFIG --job run --wait` with `workdir` as the uploaded working_dir (the config in it)."""
    from tests.multinode import base_env
    cmd = [sys.executable, "-m", "pipelines.cli", "submit", Path(config).name, "--address", ray_nodes["dashboard"],
           "--working-dir", str(workdir), "--job", "run", "--wait", *args]
    return subprocess.run(cmd, cwd=workdir, env=base_env(ray_nodes["env"]), capture_output=True, text=True,
                          timeout=1500)


def run_sections(max_failures: int = 0) -> dict:
    """Train with one worker per node (1 CPU each), ZeRO-2 over gloo as tiny.yaml does, checkpoints every 2 steps."""
    return {"train": {"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json"), "save_steps": 2,
                      "max_failures": max_failures, "workers": {"num_workers": 2, "num_cpus": 1}},
            "eval": {"world": "generated", "num_images": 4, "questions_per_image": 1, "caption_tokens": 8}}


def test_a_submitted_run_on_two_nodes_writes_pairs_adapter_and_report_to_the_bucket(
        ray_nodes, shared_models, one_node, s3_server, monkeypatch, tmp_path):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    uri = s3_server["bucket"]() + "/run"
    config = write_config(shared_models, tmp_path, uri, **run_sections())
    t0 = time.time()
    r = submit(ray_nodes, tmp_path, config)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    print(f"two-node submitted run: {time.time() - t0:.0f} s")
    assert pairs(f"{uri}/pairs").equals(one_node[0])
    root = Location(uri)
    summary = json.loads((root / "train" / "summary.json").read_text())
    assert summary["nodes"] == 2            # one worker per node
    assert summary["steps"] > 0 and (root / "train" / "adapter" / "adapter_config.json").exists()
    assert (root / "train" / "adapter" / "adapter_model.safetensors").exists()
    assert (root / "eval" / "summary.json").exists() and (root / "report.html").exists()
    assert (root / "report.md").read_text().startswith(f"# SynthAlign run report: `{uri}`")


def test_a_worker_node_lost_mid_training_resumes_from_the_checkpoint_in_the_bucket(
        ray_nodes, shared_models, one_node, s3_server, monkeypatch, tmp_path):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    uri = s3_server["bucket"]() + "/run"
    sections = run_sections(max_failures=3)
    sections["train"]["num_train_epochs"] = 3.0       # long enough to lose a node between checkpoints
    config = write_config(shared_models, tmp_path, uri, **{**sections, "eval": None})
    box = {}
    thread = threading.Thread(target=lambda: box.update(r=submit(ray_nodes, tmp_path, config)))
    thread.start()
    runs = Location(f"{uri}/train/ray/dpo")
    deadline, seen = time.time() + 900, set()
    while len(seen) < 3:     # the third has begun: the ones before are whole and reported
        assert thread.is_alive() and time.time() < deadline, box.get("r")
        seen.update(d.name for d in runs.glob("checkpoint_*"))
        time.sleep(0.5)
    killed = ray_nodes["kill_worker"]()
    time.sleep(3)
    ray_nodes["start_worker"]()
    thread.join(timeout=1500)
    r = box["r"]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert killed not in ray_nodes["alive_nodes"]()
    summary = json.loads(Location(f"{uri}/train/summary.json").read_text())
    assert summary["resumed_from_step"] >= 2 and summary["steps"] > summary["resumed_from_step"], (
        {k: summary.get(k) for k in ("steps", "resumed_from_step")}, sorted(seen), r.stdout[-3000:])
    metrics = [json.loads(line) for line in Location(f"{uri}/train/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == sorted({m["step"] for m in metrics})   # each step logged once
    assert pairs(f"{uri}/pairs").equals(one_node[0])
    print(f"lost a node at a checkpoint; resumed from step {summary['resumed_from_step']} of {summary['steps']}")


def test_doctor_names_what_the_worker_node_lacks_and_passes_a_cluster_ready_config(ray_nodes, shared_models,
                                                                                     tiny_models, bucket, tmp_path):
    from tests.multinode import base_env

    def doctor(config):
        cmd = [sys.executable, "-m", "pipelines.cli", "doctor", config, "--address", ray_nodes["gcs"]]
        return subprocess.run(cmd, cwd=ray_nodes["shared"], env=base_env(ray_nodes["env"]), text=True,
                              capture_output=True, timeout=300)
    worker = ray_nodes["worker_node_id"]()[:12]
    # Models in pytest's folder (private to the head) and a local output_dir: the worker node sees neither.
    bad = doctor(tiny_yaml(tiny_models, tmp_path, str(ray_nodes["root"] / "run")))
    problems = [ln for ln in bad.stderr.splitlines() if ln.startswith("synthalign: doctor:")]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    missing = {ln.split(": ")[2] for ln in problems if "does not exist on node" in ln and f"({worker})" in ln}
    assert missing == {"images.model", "selection.model", "samplers[0].model", "samplers[1].model",
                       "rewards.text_model", "rewards.clip_model", "train.model"}, problems
    assert any(ln.startswith("synthalign: doctor: output_dir:") and worker in ln for ln in problems)
    good = doctor(write_config(shared_models, tmp_path, f"{bucket}/doctor"))
    assert good.returncode == 0, good.stderr[-3000:]
    assert sum(ln.startswith("node ") for ln in good.stdout.splitlines()) == 2
