"""Reliability of `generate`: kill -9 and resume, duplicated or partial shards, injected faults, bad rows."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import ROOT, tiny_config

N_PROMPTS, N_INSTR = 8, 2


def keys_of(folder, column="pair_id"):
    files = sorted(Path(folder).glob("*.parquet"))
    return [k for f in files for k in pads.dataset(str(f)).to_table(columns=[column]).column(column).to_pylist()]


def expected_keys(cfg):
    from actors.prompts import load_prompts
    return {f"{r['prompt_id']}-q{j}" for r in load_prompts(cfg.prompts) for j in range(len(r["instructions"]))}


def cli_sets(cfg) -> list[str]:
    sets = {"output_dir": cfg.output_dir, "tiny_models": "null", "images.model": cfg.images.model,
            "selection.model": cfg.selection.model, "rewards.text_model": cfg.rewards.text_model,
            "rewards.clip_model": cfg.rewards.clip_model,
            "prompts.num_prompts": N_PROMPTS, "prompts.instructions_per_prompt": N_INSTR, "rows_per_shard": 2,
            "pools.images.batch_size": 1, "pools.selection.batch_size": 1, "pools.sampling.batch_size": 2,
            "pools.rewards.batch_size": 2,
            "samplers": json.dumps([{"model": s.model, "name": s.name, "n": s.n, "temperature": s.temperature,
                                     "max_new_tokens": s.max_new_tokens} for s in cfg.samplers])}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_kill_9_then_resume_gives_exactly_the_expected_pairs(tiny_models, ray_local, tmp_path):
    from pipelines.generate.job import run_generate
    cfg = tiny_config(tiny_models, tmp_path / "run", **{"prompts.num_prompts": N_PROMPTS,
                                                         "prompts.instructions_per_prompt": N_INSTR,
                                                         "rows_per_shard": 2, "pools.images.batch_size": 1, "pools.selection.batch_size": 1,
                                                         "pools.sampling.batch_size": 2,
                                                         "pools.rewards.batch_size": 2})
    from actors.prompts import load_prompts
    late = [r["prompt_id"] for r in load_prompts(cfg.prompts)][-3:]
    slow = ["--set", "faults.stage=rewards", "--set", "faults.kind=sleep", "--set", "faults.seconds=120",
            "--set", f"faults.prompt_ids={json.dumps(late)}"]  # keeps the run going until it is killed
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "generate", str(ROOT / "configs/tiny.yaml"),
                               *cli_sets(cfg), *slow], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "RAY_ADDRESS": ""})
    scored = Path(cfg.output_dir) / "scored"
    deadline = time.time() + 240
    while time.time() < deadline and not list(scored.glob("shard-*.parquet")) and driver.poll() is None:
        time.sleep(0.5)
    assert driver.poll() is None, "the driver ended before it could be killed"
    driver.send_signal(signal.SIGKILL)  # the local Ray it started dies with it
    driver.wait(timeout=30)
    before = len(keys_of(scored, "pair_key"))
    assert 0 < before < N_PROMPTS * N_INSTR
    (scored / ".shard-deadbeef.parquet.tmp").write_bytes(b"PAR1 half a file")  # as a kill mid-write leaves

    manifest = run_generate(cfg)
    c = manifest["counts"]
    assert c["prompts_resumed"] > 0 and c["errors"] == 0
    pairs = keys_of(Path(cfg.output_dir) / "pairs")
    assert len(pairs) == len(set(pairs))  # none duplicated
    dropped = sum(c["dropped"].values())
    assert set(pairs) <= expected_keys(cfg) and len(pairs) + dropped == len(expected_keys(cfg))  # none missing
    assert not list(scored.glob(".*.tmp"))

    # A shard written twice (a prompt redone after a crash) never yields a duplicate pair.
    first = sorted(scored.glob("shard-*.parquet"))[0]
    shutil.copy(first, scored / "shard-0000copy.parquet")
    from pipelines.generate.outputs import finalize
    again = finalize(Path(cfg.output_dir), 1000)
    assert again["pairs"] == c["pairs"] and again["duplicates_skipped"] > 0
    assert sorted(keys_of(Path(cfg.output_dir) / "pairs")) == sorted(pairs)


@pytest.mark.parametrize("stage,kind", [("rewards", "raise"), ("sampling", "exit"), ("rewards", "fatal")])
def test_injected_faults_are_survived(tiny_models, ray_local, tmp_path, stage, kind):
    from actors.prompts import load_prompts
    from pipelines.generate.job import run_generate
    cfg = tiny_config(tiny_models, tmp_path / "run", **{"prompts.num_prompts": 6})
    victims = [r["prompt_id"] for r in load_prompts(cfg.prompts)][1:3]
    cfg = tiny_config(tiny_models, tmp_path / "run", **{
        "prompts.num_prompts": 6, "faults.stage": stage, "faults.kind": kind,
        "faults.prompt_ids": json.dumps(victims)})
    c = run_generate(cfg)["counts"]
    markers = sorted(p.name for p in (tmp_path / "run" / ".faults").iterdir())
    assert len(markers) >= 1 and all(any(v in m for v in victims) for m in markers)  # the faults fired
    assert c["errors"] == 0 and c["duplicates_skipped"] == 0
    assert c["pairs"] + sum(c["dropped"].values()) == c["questions"] == 6 * 2
    pairs = keys_of(tmp_path / "run" / "pairs")
    assert len(pairs) == len(set(pairs))
    if kind == "fatal":  # a CUDA error ends the actor, not a row: Ray restarts it and retries the batch
        fired = [(tmp_path / "run" / ".faults" / m).read_text().split() for m in markers]
        assert len(markers) == len(victims) and all(len(pids) == 1 for pids in fired)  # once per victim
        assert len({pid for pids in fired for pid in pids}) == len(victims)  # each time in a fresh process


def release_failed_run(ray, timeout: float = 120.0) -> None:
    """A failed Ray Data run leaves its actor handles in the exception's frames (a reference cycle) until the
    garbage collector runs: collect, and wait until the pools' CPUs are free for the next test."""
    import gc
    gc.collect()
    deadline = time.time() + timeout
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] - 0.01:
        time.sleep(1)


def test_a_fatal_error_that_never_clears_fails_the_job_instead_of_quarantining(tiny_models, ray_local, tmp_path):
    """A fault that kills the device on every try: the batch is retried on a restarted actor a few times (not
    forever), then the job stops with the error; no row is quarantined as if it were a bad row. A pool per
    stage, so that only the small rewards actor restarts."""
    from ray.exceptions import RayActorError

    from actors.prompts import load_prompts
    from cluster.resources import ACTOR_TASK_RETRIES
    from pipelines.generate.job import run_generate
    base = tiny_config(tiny_models, tmp_path / "run", **{"prompts.num_prompts": 1})
    victim = [r["prompt_id"] for r in load_prompts(base.prompts)][0]
    cfg = tiny_config(tiny_models, tmp_path / "run", **{
        "prompts.num_prompts": 1, "fuse": "false", "pools.images.size": 1, "faults.stage": "rewards",
        "faults.kind": "fatal", "faults.times": -1, "faults.prompt_ids": json.dumps([victim])})
    try:
        with pytest.raises(RayActorError):  # the batch's retries are used up: its actor is gone
            run_generate(cfg)
    finally:
        release_failed_run(ray_local)
    fired = (tmp_path / "run" / ".faults" / f"rewards-{victim}").read_text().split()
    assert len(fired) == ACTOR_TASK_RETRIES + 1  # the first try and every retry, each in a new actor process
    assert len(set(fired)) == len(fired)
    assert not (tmp_path / "run" / "errors").exists()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and re.match(r"(Ray)?Actor\w*Error: ", manifest["reason"]), manifest


def test_bad_rows_are_quarantined_and_the_error_budget_enforced(tiny_models, ray_local, tmp_path):
    from actors.prompts import load_prompts
    from pipelines.generate.job import JobError, run_generate
    base = tiny_config(tiny_models, tmp_path / "run", **{"prompts.num_prompts": 6})
    victim = [r["prompt_id"] for r in load_prompts(base.prompts)][2]
    sets = {"prompts.num_prompts": 6, "faults.stage": "images", "faults.kind": "raise", "faults.times": -1,
            "faults.prompt_ids": json.dumps([victim]), "max_error_fraction": 0.5}
    c = run_generate(tiny_config(tiny_models, tmp_path / "run", **sets))["counts"]
    assert c["errors"] == 2 and c["questions"] == 12  # the victim's two image-questions
    errors = pads.dataset(str(tmp_path / "run" / "errors")).to_table().to_pylist()
    assert {e["prompt_id"] for e in errors} == {victim} and {e["stage"] for e in errors} == {"images"}
    assert all("injected fault" in e["reason"] for e in errors)
    assert victim not in {k.rsplit("-q", 1)[0] for k in keys_of(tmp_path / "run" / "pairs")}
    # Over the budget: the job fails with a clear message; the pairs already written stay as they were.
    pairs_before = sorted(keys_of(tmp_path / "run" / "pairs"))
    with pytest.raises(JobError, match=r"2 of 12 image-questions failed .* max_error_fraction 10.0%"):
        run_generate(tiny_config(tiny_models, tmp_path / "run", **{**sets, "max_error_fraction": 0.1}))
    assert sorted(keys_of(tmp_path / "run" / "pairs")) == pairs_before
    # A rerun without the fault retries the failed rows and completes.
    c = run_generate(tiny_config(tiny_models, tmp_path / "run", **{"prompts.num_prompts": 6}))["counts"]
    assert c["errors"] == 0 and c["pairs"] + sum(c["dropped"].values()) == 12
