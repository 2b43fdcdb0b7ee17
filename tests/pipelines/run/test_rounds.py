"""`rounds: 2` on the tiny config: each round its own run folder with fresh prompts, round 2 sampling and training
from round 1's adapter, every round evaluated on one held-out set; a run killed in round 2 resumes there with
round 1 untouched and ends as the uninterrupted run did."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import ROOT, tiny_config

SETS = {"rounds": 2, "prompts.num_prompts": 4, "prompts.instructions_per_prompt": 2, "rows_per_shard": 2,
        "images.batch_size": 1,   # one prompt per diffusers call: blocks of one prompt, shards from the first rows
        "pools.images.batch_size": 1, "pools.sampling.batch_size": 2, "pools.rewards.batch_size": 2,
        "train.deepspeed": "null", "train.workers.num_workers": 1, "train.max_steps": 2,
        # a learning rate that moves a random tiny model's samples after two steps
        "train.learning_rate": 0.02, "eval.num_images": 2, "eval.questions_per_image": 1, "eval.caption_tokens": 4}


def rounds_config(tiny_models, out: Path, **extra):
    cfg = tiny_config(tiny_models, out, **{**SETS, **extra})
    cfg.samplers[0].on_policy = True
    assert cfg.validate() == []
    return cfg


def table(folder: Path, columns=None) -> list[dict]:
    return pads.dataset(str(folder)).to_table(columns=columns).to_pylist()


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def two_rounds(tiny_models, ray_local, tmp_path_factory):
    from pipelines.run.job import prepare_run, run_all
    cfg = rounds_config(tiny_models, tmp_path_factory.mktemp("rounds") / "run")
    run_all(cfg, prepare_run(cfg), log=lambda m: None)
    return cfg


def test_each_round_is_a_run_folder_with_fresh_prompts(two_rounds):
    run = Path(two_rounds.output_dir)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and [r["round"] for r in manifest["rounds"]] == [1, 2]
    assert all(r["status"] == "complete" and r["train"]["steps"] == 2 for r in manifest["rounds"])
    assert manifest["rounds"][1]["previous"] == manifest["rounds"][0]["train_hash"]
    assert manifest["rounds"][1]["on_policy_samplers"] == ["tiny-llava-a"]
    ids = [{r["prompt_id"] for r in table(run / "rounds" / str(k) / "scored", ["prompt_id"])} for k in (1, 2)]
    assert len(ids[0]) == len(ids[1]) == 4 and not ids[0] & ids[1]
    from actors.prompts import default_classes, generate_prompt
    held_out = {generate_prompt(0, 4 + i, 3, 1, default_classes())["prompt_id"] for i in range(2)}  # eval's
    assert not (ids[0] | ids[1]) & held_out
    for k in (1, 2):
        assert (run / "rounds" / str(k) / "train" / "adapter" / "adapter_model.safetensors").is_file()
        assert (run / "rounds" / str(k) / "report.md").is_file()


def test_round_1_hashes_as_a_one_round_run(two_rounds):
    import copy

    from pipelines.run.rounds import round_config
    one = copy.deepcopy(two_rounds)
    one.rounds = 1
    for s in one.samplers:
        s.on_policy = False
    r1 = round_config(two_rounds, 1)
    assert (r1.hash(), r1.train_hash()) == (one.hash(), one.train_hash())
    assert round_config(two_rounds, 2).hash() != r1.hash()


def test_round_2_samples_with_round_1s_adapter(two_rounds, tiny_models):
    from actors.common.runtime import open_png
    from actors.sampling import TransformersBackend
    run = Path(two_rounds.output_dir)
    adapter = str(run / "rounds" / "1" / "train" / "adapter")
    r2 = json.loads((run / "rounds" / "2" / "manifest.json").read_text())["config"]
    assert r2["samplers"][0]["adapter"] == adapter and r2["samplers"][1]["adapter"] is None
    rows = table(run / "rounds" / "2" / "scored", ["image", "question", "pair_key", "answers", "answer_models"])
    stored = [[a for a, m in zip(r["answers"], r["answer_models"]) if m == "tiny-llava-a"] for r in rows]
    images = [open_png(r["image"]) for r in rows]
    questions, keys = [r["question"] for r in rows], [r["pair_key"] for r in rows]
    s = two_rounds.samplers[0]
    with_adapter = TransformersBackend(type(s)(**{**vars(s), "on_policy": False, "adapter": adapter}), 1)
    base = TransformersBackend(type(s)(**{**vars(s), "on_policy": False}), 1)
    assert with_adapter.answer(images, questions, keys) == stored      # the same seeds, the round-1 policy
    assert base.answer(images, questions, keys) != stored


def test_round_2_trains_on_from_round_1s_adapter(two_rounds):
    run = Path(two_rounds.output_dir)
    s1, s2 = (json.loads((run / "rounds" / str(k) / "train" / "summary.json").read_text()) for k in (1, 2))
    r1 = adapter_tensors(run / "rounds" / "1" / "train" / "adapter")
    assert s1["init_adapter"] is None and s2["init_adapter"] == str((run / "rounds" / "1" / "train" / "adapter").resolve())
    # the trainable weights round 2 started from are round 1's saved adapter, not a fresh LoRA
    assert s2["init_checksum"] == pytest.approx(sum(float(t.double().sum()) for t in r1.values()), rel=1e-6)
    assert s1["init_checksum"] is None and any(float(t.abs().max()) > 0 for k, t in r1.items() if "lora_B" in k)
    # reference = previous (the default): at step 1 the policy is its reference, so the DPO loss is log 2
    first = json.loads((run / "rounds" / "2" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert s2["reference"] == "previous" and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    r2 = adapter_tensors(run / "rounds" / "2" / "train" / "adapter")
    assert not (run / "rounds" / "2" / "train" / "adapter" / "ref").exists()   # the policy's adapter alone
    assert r2.keys() == r1.keys() and any((r2[k] - r1[k]).abs().max() > 0 for k in r1)


def test_eval_has_every_round_on_one_held_out_set(two_rounds):
    run = Path(two_rounds.output_dir)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][1]["adapter"].endswith("rounds/2/train/adapter") and summary["adapter_round"] == 2
    for r in summary["rounds"]:
        assert set(r["pope_by_strategy"]) == {"random", "popular", "adversarial"} and "chair_i" in r["chair"]
    assert summary["adapter"]["pope"] == summary["rounds"][1]["pope"]
    base = [json.loads(x)["question"] for x in (run / "eval" / "answers-base.jsonl").read_text().splitlines()]
    for k in (1, 2):   # the same questions about the same images
        answers = (run / "eval" / f"answers-round-{k}.jsonl").read_text().splitlines()
        assert [json.loads(x)["question"] for x in answers] == base
    report = (run / "report.md").read_text()
    assert "| round | pairs |" in report and "report/rounds.png" in report
    assert (run / "report" / "rounds.png").stat().st_size > 1000


def test_killed_in_round_2_resumes_there_and_ends_as_the_uninterrupted_run(two_rounds, tiny_models, ray_local,
                                                                          tmp_path):
    from actors.prompts import load_prompts
    from pipelines.run.job import prepare_run, run_all
    from pipelines.run.rounds import round_config
    cfg = rounds_config(tiny_models, tmp_path / "run")
    shutil.copytree(Path(two_rounds.output_dir) / "rounds" / "1", tmp_path / "run" / "rounds" / "1")
    before = tree_digest(tmp_path / "run" / "rounds" / "1")
    late = [r["prompt_id"] for r in load_prompts(round_config(cfg, 2).prompts)][-2:]
    sets = {**SETS, "output_dir": cfg.output_dir, "tiny_models": "null", "images.model": cfg.images.model,
            "selection.model": cfg.selection.model, "rewards.text_model": cfg.rewards.text_model,
            "rewards.clip_model": cfg.rewards.clip_model, "train.model": cfg.train.model,
            "samplers": json.dumps([{"model": s.model, "name": s.name, "n": s.n, "temperature": s.temperature,
                                     "max_new_tokens": s.max_new_tokens, "on_policy": s.on_policy}
                                    for s in cfg.samplers]),
            "faults.stage": "rewards", "faults.kind": "sleep", "faults.seconds": 120,
            "faults.prompt_ids": json.dumps(late)}  # keeps round 2 going until it is killed
    argv = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs/tiny.yaml"), *argv],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "RAY_ADDRESS": ""})
    scored = tmp_path / "run" / "rounds" / "2" / "scored"
    deadline = time.time() + 300
    while time.time() < deadline and not list(scored.glob("shard-*.parquet")) and driver.poll() is None:
        time.sleep(0.5)
    assert driver.poll() is None, "the driver ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    done = {r["pair_key"] for r in table(scored, ["pair_key"])}
    assert 0 < len(done) < 8 and not (tmp_path / "run" / "rounds" / "2" / "train").exists()

    result = run_all(cfg, prepare_run(cfg), log=lambda m: None)
    assert tree_digest(tmp_path / "run" / "rounds" / "1") == before          # round 1 untouched
    assert [r.get("skipped", False) for r in result["rounds"]] == [True, False]
    assert result["rounds"][1]["generate"]["counts"]["prompts_resumed"] > 0
    ref = Path(two_rounds.output_dir) / "rounds" / "2"
    got = tmp_path / "run" / "rounds" / "2"
    cols = ["pair_id", "chosen", "rejected", "chosen_model", "rejected_model", "margin"]
    assert sorted(table(got / "pairs", cols), key=lambda r: r["pair_id"]) == \
        sorted(table(ref / "pairs", cols), key=lambda r: r["pair_id"])
    a, b = adapter_tensors(got / "train" / "adapter"), adapter_tensors(ref / "train" / "adapter")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


def test_reference_base_measures_round_2_against_the_base(two_rounds, ray_local, tmp_path):
    """`train.reference: base`: round 2 still starts from round 1's adapter, but its DPO reference is the base
    (the adapter disabled), so the first step's loss is no longer log 2."""
    from pipelines.run.rounds import round_config
    from pipelines.train.job import run_train
    c = round_config(two_rounds, 2)
    c.train.reference = "base"
    summary = run_train(c.train, str(Path(c.output_dir) / "pairs"), str(tmp_path))
    first = json.loads((tmp_path / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["reference"] == "base" and summary["init_adapter"] == c.train.init_adapter
    assert summary["init_checksum"] == pytest.approx(
        json.loads((Path(c.output_dir) / "train" / "summary.json").read_text())["init_checksum"])
    assert abs(first["loss"] - math.log(2)) > 1e-3
    assert not (tmp_path / "train" / "adapter" / "ref").exists()
