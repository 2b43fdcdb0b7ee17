"""`synthalign doctor --smoke`: the paper's stack on twins through the real local Ray, one line per phase; a
failing phase is one line, the later ones are skipped and the command exits 2."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.smoke import PHASES, STEPS, run_smoke, smoke_config, smoke_output_dir
from tests.conftest import tiny_config


def _run(tmp_path, gpu: bool, tiny_models):
    import ray
    assert (ray.cluster_resources().get("GPU", 0) > 0) == gpu
    lines = []
    user = tiny_config(tiny_models, tmp_path / "user-run")   # the user's config: only its pool resources are used
    phases = run_smoke(user, twins_dir=str(tmp_path / "twins"), log=lines.append, scratch=str(tmp_path))
    assert [p.name for p in phases] == list(PHASES)
    assert [p.ok for p in phases] == [True] * len(PHASES), lines
    assert len(lines) == len(PHASES) and all(line.split()[3] == "ok" for line in lines), lines
    gen, train = phases[1].facts, phases[2].facts
    assert gen["questions"] == 4 and gen["images_rendered"] == 16 and gen["errors"] == 0 and gen["pairs"] > 0
    assert train["status"] == "complete" and train["steps"] == STEPS and train["deepspeed_stage"] == 2
    assert not (tmp_path / "user-run").exists()            # the user's output_dir is never written
    assert not list(tmp_path.glob("synthalign-smoke-*"))   # the smoke's own run is removed once it passed
    assert (tmp_path / "twins" / "sd3" / ".complete").exists()
    return phases, train


@pytest.mark.slow
def test_cpu_smoke_runs_every_phase_on_the_twins(ray_local, tiny_models, tmp_path):
    phases, train = _run(tmp_path, False, tiny_models)
    assert train["world_size"] == 2 and train["distributed_type"] == "DEEPSPEED"
    assert "(transformers, bfloat16)" in phases[1].detail and "gloo, float32" in phases[2].detail


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_smoke_takes_the_real_path(ray_local, tiny_models, tmp_path):
    phases, train = _run(tmp_path, True, tiny_models)
    assert "(vllm, bfloat16)" in phases[1].detail and "nccl, bf16" in phases[2].detail


def test_a_missing_model_fails_its_phase_in_one_line_and_skips_the_rest(ray_local, tmp_path):
    lines = []
    phases = run_smoke(twins_dir=str(tmp_path / "twins"), overrides={"images.model": str(tmp_path / "gone")},
                       log=lines.append, scratch=str(tmp_path))
    assert [(p.name, p.ok, p.skipped) for p in phases] == [("twins", True, False), ("generate", False, False),
                                                            ("train", False, True)]
    assert phases[1].error == f"InputError: field 'images.model': model folder not found: {tmp_path / 'gone'}"
    assert lines[1].endswith(f"FAILED: {phases[1].error}") and lines[2].split()[2] == "skipped"
    assert all("\n" not in line for line in lines)
    kept = list(tmp_path.glob("synthalign-smoke-*"))        # a failed run's folder is kept, and named
    assert len(kept) == 1 and lines[3] == f"smoke: the failed run's files are kept in {kept[0]}"


def test_cli_prints_a_line_per_phase_and_exits_2_when_one_fails(ray_local, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code = main(["doctor", "--smoke", "--twins-dir", str(tmp_path / "file" / "twins")])
    out = capsys.readouterr().out.splitlines()
    assert code == 2
    smoke = [line for line in out if line.startswith("smoke ")]
    assert [line.split()[1] for line in smoke] == list(PHASES)
    assert "FAILED: NotADirectoryError: " in smoke[0] and str(tmp_path / "file") in smoke[0]
    assert [line.split()[2] for line in smoke[1:]] == ["skipped", "skipped"]
    assert "no problem(s)" in "\n".join(out)                # the cluster itself is fine


def test_the_smoke_writes_beside_a_remote_output_dir_and_never_inside(tmp_path):
    beside = smoke_output_dir("s3://bucket/runs/paper")
    assert beside.startswith("s3://bucket/runs/.synthalign-smoke-") and not beside.startswith("s3://bucket/runs/paper")
    local = smoke_output_dir(str(tmp_path / "user-run"), scratch=str(tmp_path))
    assert Path(local).parent == tmp_path and Path(local).is_dir() and not (tmp_path / "user-run").exists()


def test_with_gpus_the_smoke_takes_vllm_bf16_nccl_and_the_users_node_groups(tiny_models, tmp_path):
    user = tiny_config(tiny_models, tmp_path / "run", **{"pools.sampling.resources": {"sampling_node": 0.01},
                                                          "train.workers.resources": {"train_node": 0.01}})
    cpu = smoke_config(str(tmp_path / "twins"), str(tmp_path / "out"), gpus=0.0)
    assert {s.backend for s in cpu.samplers} == {"transformers"} and not cpu.train.workers.use_gpu
    assert cpu.images.dtype == cpu.rewards.dtype == cpu.samplers[2].dtype == "bfloat16" and not cpu.train.bf16
    gpu = smoke_config(str(tmp_path / "twins"), str(tmp_path / "out"), gpus=1.0, base=user)
    assert {s.backend for s in gpu.samplers} == {"vllm"} and gpu.train.bf16 and gpu.train.workers.use_gpu
    assert gpu.train.workers.num_workers == 1 and gpu.train.max_steps == STEPS and gpu.eval is None
    assert sum(p.num_gpus for p in gpu.running_pools().values()) <= 1.0     # the stages share one GPU
    assert gpu.pools["sampling"].resources == {"sampling_node": 0.01}
    assert gpu.train.workers.resources == {"train_node": 0.01}
    assert gpu.samplers[1].model == str(tmp_path / "twins" / "llava-next-vicuna-13b")
    assert smoke_config(str(tmp_path), str(tmp_path), gpus=4.0).train.workers.num_workers == 2
