"""Shared fixtures: tiny models built once per test run, one local Ray for the session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data"          # POPE and MMHal-Bench files vendored in the repo (see its README)

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def coco_vocab():
    """The 80 COCO classes with their synonyms, as the package ships them."""
    from actors.common.objects import COCO_SYNONYMS, ObjectVocab
    return ObjectVocab.from_file(COCO_SYNONYMS)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from pipelines.models.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def twin_models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight twins of configs/paper.yaml's models (SD3, LLaVA-NeXT, ArmoRM-style reward, LLaVA-1.5)."""
    from pipelines.models.twins import make_twins
    return make_twins(tmp_path_factory.mktemp("twins"))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test run (ray.init costs 8-15 s here); Prometheus on METRICS_PORT."""
    import ray
    if not ray.is_initialized():
        # RAY_API_SERVER_ADDRESS: with other local clusters on the machine, Ray Train's placement-group cleaner
        # could query another cluster's dashboard, take our run for dead and kill it (see test_train.py).
        from cluster.connect import local_system_config
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT,
                 _system_config=local_system_config(2),
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}})
    yield ray
    ray.shutdown()


def tiny_config(tiny: dict[str, Path], output_dir: Path, **overrides):
    """configs/tiny.yaml pointed at the session's tiny models and a test folder."""
    from pipelines.config import load_config
    sets = [f"output_dir={output_dir}", "tiny_models=null", f"images.model={tiny['sd']}",
            f"selection.model={tiny['clip']}", f"rewards.text_model={tiny['reward']}",
            f"rewards.clip_model={tiny['clip']}",
            f"train.model={tiny['llava']}"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    cfg.samplers[0].model = str(tiny["llava"])
    cfg.samplers[1].model = str(tiny["llava-b"])
    return cfg
