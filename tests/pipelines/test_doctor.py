"""`synthalign doctor`: every node probed on a real local Ray, each problem one line naming the config key."""
from __future__ import annotations

import platform
import subprocess
import sys

from cluster.doctor import NodeFacts
from pipelines.doctor import diagnose, version_problems
from tests.conftest import ROOT, tiny_config, tiny_yaml


def _facts(address: str, torch: str, ray_gpus: float = 0.0, gpus=()) -> NodeFacts:
    return NodeFacts(node_id=address * 3, address=address, python="3.11.7", cuda=None, nccl=None,
                     packages={"torch": torch, "transformers": "5.20.2", "vllm": None}, gpus=list(gpus),
                     ray_gpus=ray_gpus)


def test_versions_that_differ_across_nodes_and_gpus_torch_cannot_see_are_named():
    nodes = [_facts("10.0.0.1", "2.14.0"), _facts("10.0.0.2", "2.13.0+cpu", ray_gpus=8)]
    lines = [str(p) for p in version_problems(nodes)]
    assert lines == ["nodes: torch differs across nodes: 2.14.0 on 10.0.0.1; 2.13.0+cpu on 10.0.0.2",
                     f"nodes: node {nodes[1].name}: Ray offers 8 GPU(s) but torch sees none (torch 2.13.0+cpu, "
                     "CUDA build None): install a CUDA torch"]
    assert version_problems([_facts("a", "2.14.0"), _facts("b", "2.14.0", ray_gpus=1, gpus=["A10G"])]) == []


def test_a_good_config_has_no_problems_and_each_node_reports_what_it_runs(ray_local, tiny_models, tmp_path):
    import torch
    cfg = tiny_config(tiny_models, tmp_path / "run")
    nodes, problems = diagnose(cfg)
    assert problems == []
    assert len(nodes) == 1 and nodes[0].python == platform.python_version()
    assert nodes[0].packages["torch"] == torch.__version__ and nodes[0].gpus == []
    assert not list((tmp_path / "run").glob(".doctor-*"))     # the write probe cleans up


def test_each_problem_is_one_line_naming_its_key(ray_local, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))      # no token file
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "file").write_text("not a folder")
    cfg = tiny_config(tiny_models, tmp_path / "file" / "run", **{"pools.rewards.num_gpus": 1, "fuse": False})
    cfg.samplers[0].model = str(tmp_path / "no-such-model")
    cfg.samplers[1].backend = "vllm"
    cfg.images.model = "stabilityai/stable-diffusion-3-medium-diffusers"
    _, problems = diagnose(cfg)
    got = {(p.key, p.message.split(" ")[0]) for p in problems}
    assert ("samplers[0].model", str(tmp_path / "no-such-model")) in got
    assert ("samplers", "backend") in got                     # vllm not installed on the node
    assert ("pools", "ask") in got                            # 1 GPU asked, none in the cluster
    assert ("output_dir", "node") in got                      # cannot write under a file
    sd3 = [p.message for p in problems if p.key == "images.model"]
    assert any("gated: set HF_TOKEN" in m for m in sd3) and any("HF_HUB_OFFLINE" in m for m in sd3)
    assert all("\n" not in str(p) for p in problems)


def test_cli_prints_a_line_per_node_and_exits_2_on_a_problem(tiny_models, tmp_path):
    config = tiny_yaml(tiny_models, tmp_path, str(tmp_path / "run"))
    base = [sys.executable, "-m", "pipelines.cli", "doctor", config]
    ok = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "node " in ok.stdout and "Hugging Face token:" in ok.stdout and "no problem(s)" in ok.stdout
    bad = subprocess.run(base + ["--set", f"train.model={tmp_path / 'gone'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    assert f"synthalign: doctor: train.model: {tmp_path / 'gone'} does not exist on node" in bad.stderr
    assert "Traceback" not in bad.stderr
