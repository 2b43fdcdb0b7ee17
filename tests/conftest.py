"""Shared fixtures: tiny models built once per test run, one local Ray for the session."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["tests.multinode"]  # multi-node Ray + S3 fixtures
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


@contextlib.contextmanager
def private_cluster(head_args: dict, nodes: list[dict]):
    """A `ray.cluster_utils.Cluster` of its own, connected; the session's Ray is given back afterwards."""
    import ray
    from ray.cluster_utils import Cluster
    was_connected = ray.is_initialized()
    if was_connected:
        ray.shutdown()
    # Cluster writes its address to <ray temp dir>/ray_current_cluster, which a plain `ray.init()` anywhere
    # on this machine would then join: give this cluster a private temp dir (short: socket paths are
    # limited to ~107 bytes) so concurrent test runs never find it.
    tmp = tempfile.mkdtemp(prefix="sa-pl-", dir="/tmp")
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    # Small object stores; each simulated node still sees the whole machine's memory. No dashboard and no
    # Ray Client server are started. (node_ip_address=127.0.0.1 hangs here: in Ray 2.60 the nodes then look
    # for the GCS at the machine's IP and wait for it forever.)
    common = {"object_store_memory": 150 * 1024 ** 2}
    c = Cluster(initialize_head=True, head_node_args={**common, "include_dashboard": False, **head_args})
    try:
        added = [c.add_node(**common, **n) for n in nodes]
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c, added
    finally:
        ray.shutdown()
        c.shutdown()
        if old_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmpdir
        shutil.rmtree(tmp, ignore_errors=True)
        if was_connected:  # give later tests the session Ray back, as ray_local made it
            init_session_ray()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


def init_session_ray() -> None:
    """The session's local Ray: Prometheus on METRICS_PORT. RAY_API_SERVER_ADDRESS: with other local clusters on
    the machine, Ray Train's placement-group cleaner could query another cluster's dashboard, take our run for dead
    and kill it (see test_train.py)."""
    import ray

    from cluster.connect import local_system_config
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT,
             _system_config=local_system_config(2),
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}})


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test run (ray.init costs 8-15 s here)."""
    import ray
    if not ray.is_initialized():
        init_session_ray()
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


def tiny_yaml(tiny: dict[str, Path], folder: Path, output_dir: str, **sections) -> str:
    """A config file that extends configs/tiny.yaml with the session's tiny models and `sections` merged over it:
    what a CLI subprocess or a job takes."""
    import yaml
    sampler = {"temperature": 1.0, "max_new_tokens": 16, "batch_size": 8}
    cfg = {"extends": str(ROOT / "configs" / "tiny.yaml"), "output_dir": output_dir, "tiny_models": None,
           "images": {"model": str(tiny["sd"])}, "selection": {"model": str(tiny["clip"])},
           "samplers": [{"model": str(tiny["llava"]), "name": "tiny-llava-a", "n": 2, **sampler},
                        {"model": str(tiny["llava-b"]), "name": "tiny-llava-b", "n": 1, **sampler}],
           "rewards": {"text_model": str(tiny["reward"]), "clip_model": str(tiny["clip"])},
           "train": {"model": str(tiny["llava"])}}
    for key, value in sections.items():   # a section merges over the one above (the extends file merges too)
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path = folder / f"config-{len(list(folder.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
