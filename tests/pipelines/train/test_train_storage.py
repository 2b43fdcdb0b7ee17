"""Training whose pairs and output_dir are on object storage: a moto S3 server (tests/multinode.py `s3_server`),
pairs read from s3://bucket/pairs, everything written to s3://bucket/run, and a rerun that resumes from the
Ray Train checkpoint in the bucket.

Ray here is two simulated nodes with one CPU each, so the two training workers land on different nodes and
each node builds its own records. The nodes get the AWS_* variables in their environment, as a real cluster's
nodes have them (or `synthalign submit` puts them in the job's runtime_env); the driver has them too.

A module of its own: `private_cluster` gives the session's local Ray back when it ends.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import private_cluster

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_pairs_parquet, make_tiny_llava  # noqa: E402

from cluster.resources import WorkersConfig  # noqa: E402
from cluster.storage import Location  # noqa: E402
from pipelines.folder import RunFolder  # noqa: E402
from pipelines.train.config import LoraConfig, TrainConfig  # noqa: E402
from pipelines.train.job import read_metrics, run_train  # noqa: E402

FIRST, MORE, N_PAIRS = 4, 4, 32


@pytest.fixture(scope="module")
def s3_ray(s3_server, tmp_path_factory):
    """The bucket with the pairs in it, and a Ray of two nodes whose processes can reach the bucket."""
    import pyarrow.fs as pafs
    env = dict(s3_server["env"])
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        bucket = s3_server["bucket"]()
        root = tmp_path_factory.mktemp("train-s3")
        pairs = make_pairs_parquet(root / "pairs", n=N_PAIRS)
        dest = Location(f"{bucket}/pairs")
        pafs.copy_files(str(pairs), dest.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=dest.fs)
        # RAY_API_SERVER_ADDRESS: Ray Train's placement-group cleaner must not ask another local cluster's
        # dashboard about our run (see test_train.py's ray_cluster).
        node_env = {**env, "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}
        with private_cluster({"num_cpus": 1, "env_vars": node_env}, [{"num_cpus": 1, "env_vars": node_env}]):
            yield {"bucket": bucket, "pairs": dest.uri, "model": make_tiny_llava(root / "models")}


def s3_cfg(model, max_steps: int) -> TrainConfig:
    return TrainConfig(
        model=str(model), learning_rate=5e-3, lr_scheduler_type="constant", warmup_ratio=0.0,
        max_steps=max_steps, per_device_batch_size=4, save_steps=FIRST, logging_steps=1, num_to_keep=2,
        gradient_checkpointing=False, lora=LoraConfig(dropout=0.0), workers=WorkersConfig(num_workers=2))


def scratch_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("synthalign-train-*")}


@pytest.fixture(scope="module")
def first_run(s3_ray):
    out = f"{s3_ray['bucket']}/run"
    before = scratch_dirs()
    summary = run_train(s3_cfg(s3_ray["model"], FIRST), s3_ray["pairs"], out, resume=False)
    return out, summary, scratch_dirs() - before


def test_pairs_on_s3_are_listed_and_checked(s3_server, monkeypatch, tmp_path):
    """Before anything starts: remote pairs files are listed one by one and checked like local ones, and a
    remote starting adapter must be there."""
    import pyarrow as pa

    from actors.common.errors import InputError
    from cluster.storage import write_table
    from pipelines.train.data import parquet_files
    from pipelines.train.job import check_recipe
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    bucket = s3_server["bucket"]()
    pairs = make_pairs_parquet(tmp_path / "pairs", n=4)
    for f in sorted(pairs.glob("*.parquet")):
        Location(f"{bucket}/pairs/{f.name}").write_bytes(f.read_bytes())
    assert parquet_files(f"{bucket}/pairs") == [f"{bucket}/pairs/part-000.parquet", f"{bucket}/pairs/part-001.parquet"]
    assert parquet_files(f"{bucket}/pairs/part-001.parquet") == [f"{bucket}/pairs/part-001.parquet"]
    write_table(pa.table({"pair_id": ["a"], "image": [b"x"]}), Location(f"{bucket}/bad/x.parquet"))
    with pytest.raises(InputError, match="missing column") as e:
        parquet_files(f"{bucket}/bad")
    assert str(e.value).startswith(f"{bucket}/bad/x.parquet")
    with pytest.raises(InputError, match="no \\*.parquet"):
        parquet_files(f"{bucket}/nothing")
    with pytest.raises(InputError, match="no PEFT adapter"):
        check_recipe(TrainConfig(model="org/model", init_adapter=f"{bucket}/adapter"))
    Location(f"{bucket}/adapter/adapter_config.json").write_text("{}")
    assert check_recipe(TrainConfig(model="org/model", init_adapter=f"{bucket}/adapter")).init_adapter == \
        f"{bucket}/adapter"


@pytest.mark.slow
def test_pairs_on_s3_train_into_s3(first_run):
    from safetensors.torch import load
    out, summary, left = first_run
    paths = RunFolder.at(out).train_paths()
    assert summary["steps"] == FIRST and summary["resumed_from_step"] == 0
    assert summary["world_size"] == 2 and summary["nodes"] == 2          # one worker per node
    assert summary["rows_used"] == N_PAIRS and summary["rows_dropped"] == 0
    assert summary["records_mb"] > 0                                      # built in the nodes' scratch folders
    assert summary["adapter"] == f"{out}/train/adapter" and summary["metrics"] == f"{out}/train/metrics.jsonl"
    assert not left, f"node scratch folders left behind: {left}"

    # Every result is in the bucket: adapter, metrics, TensorBoard events, summary, Ray Train checkpoint.
    names = {loc.name for loc in paths["adapter"].glob()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json"} <= names, names
    assert [m["step"] for m in read_metrics(out)] == list(range(1, FIRST + 1))
    assert paths["tb"].glob("events.out.tfevents.*")
    assert json.loads(paths["summary"].read_text())["checkpoint"] == summary["checkpoint"]
    assert summary["checkpoint"].startswith(f"{paths['run'].uri}/checkpoint_")
    state = Location(summary["checkpoint"]) / "checkpoint" / "trainer_state.json"
    assert json.loads(state.read_text())["global_step"] == FIRST

    # The LoRA weights moved from their start (B starts at zero).
    adapter = load((paths["adapter"] / "adapter_model.safetensors").read_bytes())
    assert adapter and all("lora_" in k for k in adapter)
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 1e-4


@pytest.mark.slow
def test_rerun_resumes_from_the_checkpoint_in_the_bucket(s3_ray, first_run):
    out, _, _ = first_run
    before = read_metrics(out)
    summary = run_train(s3_cfg(s3_ray["model"], FIRST + MORE), s3_ray["pairs"], out)   # resume=True
    assert summary["resumed_from_step"] == FIRST and summary["steps"] == FIRST + MORE
    after = read_metrics(out)
    assert [m["step"] for m in after] == list(range(1, FIRST + MORE + 1))
    assert after[:FIRST] == before
    state = Location(summary["checkpoint"]) / "checkpoint" / "trainer_state.json"
    assert json.loads(state.read_text())["global_step"] == FIRST + MORE
