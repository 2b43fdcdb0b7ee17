"""DPO training on Ray Train: TRL DPOTrainer + PEFT LoRA (+ DeepSpeed) on 2 CPU workers, checkpoint and resume.

The Ray runs are module fixtures shared between tests (each `fit()` costs ~25-45 s here):
  ddp_run        DDP (gloo), a failure injected after the step-8 checkpoint, retried by FailureConfig
  reference_run  the same config without the failure
  zero2_run      DeepSpeed ZeRO-2 (a copy of it is then rerun for 8 more steps: resume of a DeepSpeed checkpoint)
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import COLOURS, QUESTION, make_pairs_parquet, make_tiny_llava  # noqa: E402

from cluster.resources import WorkersConfig  # noqa: E402
from pipelines.folder import RunFolder  # noqa: E402
from pipelines.models.tiny import hub_key  # noqa: E402
from pipelines.train.config import (  # noqa: E402
    LoraConfig,
    TrainConfig,
    check_with_libraries,
    load_deepspeed_config,
)
from pipelines.train.data import to_trl_records  # noqa: E402
from pipelines.train.job import read_metrics, run_train  # noqa: E402

STEPS, FAIL_AT = 16, 8
ZERO2 = "configs/deepspeed/zero2.json"
N_GOOD, N_BAD = 64, 2


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "model": make_tiny_llava(root / "models"),
            "data": make_pairs_parquet(root / "pairs", n=N_GOOD, bad_rows=N_BAD)}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    started = not ray.is_initialized()
    if started:
        # Train V2's PlacementGroupCleaner asks the State API whether the controller is alive. With several local
        # Ray clusters on one machine (parallel test runs) it auto-detects another cluster's dashboard, gets "not
        # found", takes our live controller for dead and removes its placement group, killing the workers. Point
        # the State API at our own (absent) dashboard: queries then fail as "unavailable" and the cleaner waits.
        ray.init(num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


def tiny_cfg(assets, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        model=str(assets["model"]), learning_rate=5e-3, lr_scheduler_type="constant", warmup_ratio=0.0,
        max_steps=STEPS, per_device_batch_size=4, save_steps=FAIL_AT, logging_steps=1, num_to_keep=2,
        gradient_checkpointing=False, lora=LoraConfig(dropout=0.0), workers=WorkersConfig(num_workers=2),
        projector_lr=5e-3)   # as the paper's recipe: LoRA on the language model, the projector trained whole
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, assets):
    out = assets["root"] / "ddp"
    summary = run_train(tiny_cfg(assets, max_failures=1, merge_adapter=True), str(assets["data"]), str(out),
                        resume=False, fail_at_step=FAIL_AT)
    return out, summary


@pytest.fixture(scope="module")
def reference_run(ray_cluster, assets):
    out = assets["root"] / "reference"
    return out, run_train(tiny_cfg(assets), str(assets["data"]), str(out), resume=False)


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, assets):
    out = assets["root"] / "zero2"
    cfg = tiny_cfg(assets, deepspeed=ZERO2)
    return out, run_train(cfg, str(assets["data"]), str(out), resume=False)


# ---------------------------------------------------------------- helpers

def mean(xs):
    return sum(xs) / len(xs)


def assert_learned(metrics: list[dict]):
    """Loss falls and the reward margin rises (first vs last logged steps, 3-step means against noise)."""
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "learning_rate"} <= set(m)
    first, last = metrics[:3], metrics[-3:]
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)   # log(2): the adapter starts as a no-op
    assert mean([m["loss"] for m in last]) < mean([m["loss"] for m in first]) - 0.03
    assert mean([m["rewards/margins"] for m in last]) > mean([m["rewards/margins"] for m in first]) + 0.05
    assert mean([m["rewards/accuracies"] for m in last]) >= 0.75


def assert_data_parallel(summary: dict, distributed_type: str):
    assert summary["distributed_type"] == distributed_type
    assert summary["num_processes"] == summary["world_size"] == 2
    a, b = summary["replica_checksums"]
    assert a == pytest.approx(b, abs=1e-9), "the two replicas hold different adapters (not synchronised)"
    assert summary["rows_used"] == N_GOOD and summary["rows_dropped"] == N_BAD
    assert summary["trainable_in_vision_tower"] == 0 and summary["projector_trained"]
    assert summary["trainable_params"] > 0


def train_paths(out) -> dict[str, Path]:
    """The train layout of a local run folder, as local paths."""
    return {k: v.local for k, v in RunFolder.at(out).train_paths().items()}


def losses(out) -> list[float]:
    return [m["loss"] for m in read_metrics(out)]


# ---------------------------------------------------------------- no Ray

def test_to_trl_records_matches_trl_vision_format(assets):
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    table = pq.read_table(str(assets["data"]))
    records = to_trl_records(table)
    assert len(records) == N_GOOD                       # the 2 bad rows are dropped
    rec = records[0]
    assert isinstance(rec["images"][0], Image.Image) and rec["images"][0].size == (32, 32)
    assert rec["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert rec["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    assert rec["rejected"][0]["role"] == "assistant" and rec["rejected"][0]["content"][0]["text"] in COLOURS
    with pytest.raises(ValueError, match="chosen == rejected|empty question"):
        to_trl_records(table, drop_invalid=False)

    # TRL's own vision collator takes the records: 16 image tokens per sequence, completions masked in.
    processor = AutoProcessor.from_pretrained(assets["model"])
    batch = DataCollatorForVisionPreference(processor)([dict(r) for r in records[:2]])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["input_ids"].shape[0] == 4 and "pixel_values" in batch
    assert ((batch["input_ids"] == image_id).sum(dim=1) == 16).all()
    assert (batch["completion_mask"].sum(dim=1) > 0).all()


def test_token_length_counts_image_tokens_like_the_collator(assets):
    import pyarrow.parquet as pq
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from pipelines.train.data import token_length as _token_length
    processor = AutoProcessor.from_pretrained(assets["model"])
    row = pq.read_table(str(assets["data"])).slice(0, 1).to_pylist()[0]
    batch = DataCollatorForVisionPreference(processor)([dict(to_trl_records([row])[0])])
    assert _token_length(row, processor) == int(batch["attention_mask"].sum(dim=1).max())


def test_config_validation_and_deepspeed_files():
    from pipelines.typed import from_dict
    assert TrainConfig(model="m").validate() == []
    bad = TrainConfig(model="m", beta=0, loss_type="nope", warmup_ratio=1.5, max_steps=0, num_to_keep=0,
                      report_to=["tensorboard", "bogus"], deepspeed="configs/deepspeed/missing.json",
                      max_length=0, lora=LoraConfig(r=0, target_modules=[]), lr_scheduler_type="sometimes")
    keys = {p.key for p in bad.validate() + check_with_libraries(bad)}
    assert {"train.beta", "train.loss_type", "train.warmup_ratio", "train.max_steps", "train.num_to_keep",
            "train.report_to", "train.deepspeed", "train.max_length", "train.lora.r", "train.lora.target_modules",
            "train.lr_scheduler_type"} <= keys, keys
    # The names come from the libraries themselves: TRL's documented loss types, transformers' schedulers.
    assert check_with_libraries(TrainConfig(model="m", loss_type="ipo", lr_scheduler_type="cosine_with_min_lr")) == []
    # The YAML loader accepts the added fields.
    cfg = from_dict(TrainConfig, {"model": "m", "max_length": None, "gradient_checkpointing": False,
                                  "lora": {"r": 4}, "deepspeed": "configs/deepspeed/zero3.json"})
    assert cfg.lora.r == 4 and cfg.validate() == []
    for stage in (2, 3):
        ds = load_deepspeed_config(f"configs/deepspeed/zero{stage}.json")
        assert ds["zero_optimization"]["stage"] == stage
        assert "optimizer" not in ds and ds["zero_force_ds_cpu_optimizer"] is False   # torch AdamW, no compile
        assert ds["train_micro_batch_size_per_gpu"] == "auto"


def test_run_train_rejects_bad_input_before_starting_anything(assets, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.common.errors import InputError
    with pytest.raises(InputError, match="train.model"):
        run_train(TrainConfig(), str(assets["data"]), str(tmp_path))
    with pytest.raises(InputError, match="no \\*.parquet"):
        run_train(tiny_cfg(assets), str(tmp_path / "empty"), str(tmp_path))
    (tmp_path / "notpairs").mkdir()
    pq.write_table(pa.table({"pair_id": ["a"], "image": [b"x"]}), tmp_path / "notpairs" / "x.parquet")
    with pytest.raises(InputError, match="missing column"):
        run_train(tiny_cfg(assets), str(tmp_path / "notpairs"), str(tmp_path))
    assert not (tmp_path / "train").exists()


NO_RAY_CHILD = """
import sys
import ray
from pipelines.train.config import TrainConfig
from pipelines.train.job import run_train
try:
    run_train(TrainConfig(model=sys.argv[1], max_steps=2), sys.argv[2], sys.argv[3])
except RuntimeError as e:
    print("refused:", e)
print("ray initialized:", ray.is_initialized())
"""


def test_run_train_needs_a_ray_connection(assets, tmp_path):
    """Library code never starts Ray: without a connection run_train refuses before writing anything. In a child
    process, which has no connection whatever this one has (a whole run has the session's Ray up)."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", NO_RAY_CHILD, str(assets["model"]), str(assets["data"]),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refused: run_train needs a Ray connection: call ray.init() first" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "ray initialized: False" in r.stdout
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- Ray Train runs

@pytest.mark.slow
def test_ddp_two_workers_trains_lora_on_the_language_model_and_the_projector(ddp_run, assets):
    import torch
    from safetensors.torch import load_file
    out, summary = ddp_run
    assert_data_parallel(summary, "MULTI_CPU")
    assert summary["steps"] == STEPS and summary["deepspeed_stage"] is None
    assert_learned(read_metrics(out))
    paths = train_paths(out)
    assert list(paths["tb"].glob("events.out.tfevents.*"))

    # The adapter holds LoRA weights of the language model (B starts at zero: they changed) and the projector.
    adapter = load_file(paths["adapter"] / "adapter_model.safetensors")
    assert adapter and all(("lora_" in k and "language_model" in k) or "multi_modal_projector" in k for k in adapter)
    assert any("multi_modal_projector" in k for k in adapter) and not any("vision_tower" in k for k in adapter)
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 1e-3
    # The merged model differs from the base only in the LoRA-targeted projections of the language model and
    # in the projector: the vision tower is untouched.
    base = load_file(Path(assets["model"]) / "model.safetensors")
    # Saved in the hub's weight names (vLLM's LLaVA loader needs them); the same weights otherwise.
    base = {hub_key(k): v for k, v in base.items()}
    merged = load_file(paths["merged"] / "model.safetensors")
    assert set(base) == set(merged) and any(k.startswith("vision_tower.vision_model.") for k in merged)
    targeted = ("q_proj", "k_proj", "v_proj", "o_proj")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(("language_model" in k and any(t in k for t in targeted)) or "multi_modal_projector" in k
                           for k in changed), sorted(changed)[:5]
    assert any("language_model" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)


@pytest.mark.slow
def test_failure_after_checkpoint_resumes_with_identical_losses(ddp_run, reference_run):
    out, summary = ddp_run
    ref_out, ref_summary = reference_run
    assert summary["resumed_from_step"] == FAIL_AT and ref_summary["resumed_from_step"] == 0
    assert summary["steps"] == ref_summary["steps"] == STEPS
    assert [m["step"] for m in read_metrics(out)] == list(range(1, STEPS + 1))   # no duplicated steps
    assert losses(out) == pytest.approx(losses(ref_out), abs=1e-4)
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], abs=1e-4)


@pytest.mark.slow
def test_zero2_two_workers(zero2_run, reference_run):
    out, summary = zero2_run
    assert_data_parallel(summary, "DEEPSPEED")
    assert summary["deepspeed_stage"] == 2 and summary["steps"] == STEPS
    assert_learned(read_metrics(out))
    # Same data order and fp32 sums as DDP: the curve matches the uninterrupted DDP run.
    assert losses(out) == pytest.approx(losses(reference_run[0]), abs=1e-4)
    # The optimizer state is partitioned over the 2 ranks and both shards reached Ray Train storage.
    shards = sorted(p.name for p in Path(summary["checkpoint"]).glob("checkpoint/global_step*/*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.slow
def test_saved_adapter_loads_on_the_base_model_and_generates(ddp_run, assets):
    import torch
    out, _ = ddp_run
    adapter_dir = train_paths(out)["adapter"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                   # 2 threads on 2 cores is erratic
    try:
        _check_adapter(adapter_dir, assets)
    finally:
        torch.set_num_threads(threads)


def _check_adapter(adapter_dir, assets):
    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(adapter_dir)
    base = AutoModelForImageTextToText.from_pretrained(assets["model"]).eval()
    tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(assets["model"]),
                                      adapter_dir).eval()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False)

    def answer_logp(model, image, answer: str) -> float:
        full = processor(images=[image], text=[prompt + answer], return_tensors="pt", add_special_tokens=False)
        n_prompt = len(processor(images=[image], text=[prompt], add_special_tokens=False)["input_ids"][0])
        with torch.no_grad():
            logits = model(**full).logits[0, :-1].log_softmax(-1)
        ids = full["input_ids"][0, 1:]
        return float(logits[n_prompt - 1:].gather(-1, ids[n_prompt - 1:, None]).sum())

    # The trained adapter prefers the right colour more than the base model does (the DPO implicit reward).
    gains = []
    for colour, rgb in COLOURS.items():
        image = Image.new("RGB", (32, 32), rgb)
        for wrong in COLOURS:
            if wrong != colour:
                gains.append((answer_logp(tuned, image, colour) - answer_logp(tuned, image, wrong))
                             - (answer_logp(base, image, colour) - answer_logp(base, image, wrong)))
    assert mean(gains) > 0 and sum(g > 0 for g in gains) >= len(gains) * 0.75

    inputs = processor(images=[Image.new("RGB", (32, 32), COLOURS["red"])], text=[prompt], return_tensors="pt")
    gen = tuned.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_rerun_on_same_output_dir_continues_from_latest_checkpoint(zero2_run, assets):
    src, _ = zero2_run
    out = assets["root"] / "rerun"
    shutil.copytree(src, out)                  # leave the shared run untouched for the other tests
    before = read_metrics(out)
    cfg = tiny_cfg(assets, max_steps=STEPS + FAIL_AT, deepspeed=ZERO2)
    summary = run_train(cfg, str(assets["data"]), str(out))      # resume=True: the default
    assert summary["resumed_from_step"] == STEPS and summary["steps"] == STEPS + FAIL_AT
    assert summary["distributed_type"] == "DEEPSPEED"
    after = read_metrics(out)
    assert [m["step"] for m in after] == list(range(1, STEPS + FAIL_AT + 1))
    assert after[:STEPS] == before
    assert json.loads(train_paths(out)["summary"].read_text())["steps"] == STEPS + FAIL_AT


@pytest.mark.gpu
@pytest.mark.slow
def test_zero3_bf16_on_gpus(ray_cluster, assets):
    import ray
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not ray.cluster_resources().get("GPU"):
        pytest.skip("the Ray cluster has no GPUs")
    n = min(2, int(ray.cluster_resources()["GPU"]))
    out = assets["root"] / "zero3"
    cfg = tiny_cfg(assets, bf16=True, deepspeed="configs/deepspeed/zero3.json",
                   workers=WorkersConfig(num_workers=n, use_gpu=True, num_gpus=1.0))
    summary = run_train(cfg, str(assets["data"]), str(out), resume=False)
    assert summary["distributed_type"] == "DEEPSPEED" and summary["deepspeed_stage"] == 3
    assert summary["steps"] == STEPS and summary["trainable_params"] > 0
    metrics = read_metrics(out)
    assert mean([m["loss"] for m in metrics[-3:]]) < mean([m["loss"] for m in metrics[:3]])
    assert (train_paths(out)["adapter"] / "adapter_model.safetensors").exists()
