"""A training run records how it ended in train/summary.json: `complete` with its figures, or `failed` with the
reason, so that a later reader (a rerun of `synthalign run`'s rounds, a person) sees a failure, not nothing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_pairs_parquet, make_tiny_llava  # noqa: E402

from cluster.resources import WorkersConfig  # noqa: E402
from pipelines.folder import RunFolder  # noqa: E402
from pipelines.train.config import LoraConfig, TrainConfig  # noqa: E402
from pipelines.train.job import run_train  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-status")
    return {"model": make_tiny_llava(root / "models"), "data": make_pairs_parquet(root / "pairs", n=8)}


def recipe(model, **overrides) -> TrainConfig:
    cfg = TrainConfig(model=str(model), max_steps=2, per_device_batch_size=2, gradient_checkpointing=False,
                      lora=LoraConfig(dropout=0.0), workers=WorkersConfig(num_workers=1), max_failures=0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def summary_of(out: Path) -> dict:
    return json.loads((out / "train" / "summary.json").read_text())


def test_a_trainer_that_raises_leaves_a_failed_summary_with_the_reason(assets, ray_local, tmp_path, monkeypatch):
    from ray.train.torch import TorchTrainer

    def fit(self):
        raise RuntimeError("worker group lost\nmore detail")
    monkeypatch.setattr(TorchTrainer, "fit", fit)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="worker group lost"):
        run_train(recipe(assets["model"]), str(assets["data"]), str(out))
    assert summary_of(out) == {"status": "failed", "reason": "RuntimeError: worker group lost"}
    assert not RunFolder.at(out).trained()   # a rerun of the rounds trains this round again


def test_a_finished_run_says_complete(assets, ray_local, tmp_path, monkeypatch):
    """The summary the worker writes gets `status: complete` (fit stands in for a real one: see test_train.py)."""
    from ray.train.torch import TorchTrainer

    class Result:
        checkpoint = None

    def fit(self):
        (out / "train" / "summary.json").write_text(json.dumps({"steps": 2, "final_loss": 0.69}))
        return Result()
    monkeypatch.setattr(TorchTrainer, "fit", fit)
    out = tmp_path / "run"
    summary = run_train(recipe(assets["model"]), str(assets["data"]), str(out))
    assert summary["status"] == "complete" and summary_of(out)["status"] == "complete"
    assert summary_of(out)["steps"] == 2 and RunFolder.at(out).trained()


def test_a_model_that_fails_to_load_in_the_workers_leaves_a_failed_summary(assets, ray_local, tmp_path):
    """An existing model folder passes the checks before Ray starts; its broken weights fail in the worker."""
    import shutil
    broken = tmp_path / "broken-llava"
    shutil.copytree(assets["model"], broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    out = tmp_path / "run"
    with pytest.raises(Exception) as e:
        run_train(recipe(broken), str(assets["data"]), str(out))
    summary = summary_of(out)
    # Ray Train's error, with the worker's own: its first line alone says only "Training failed due to worker errors"
    assert summary == {"status": "failed", "reason": f"{type(e.value).__name__}: rank 0: SafetensorError: Error "
                                                      "while deserializing header: header too large"}
    assert not RunFolder.at(out).trained()
