"""The recipe's LoRA and optimizer as the paper's code has them: the vision tower frozen, LoRA on the language
model only, the projector trained at its own learning rate, the global batch kept whatever the worker count.
In-process TRL (no Ray): the Ray Train runs in test_train.py use the same `dpo_args` / `lora_config`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_pairs_parquet, make_tiny_llava  # noqa: E402

from pipelines.train.config import LoraConfig, TrainConfig  # noqa: E402
from pipelines.train.dpo import PROJECTOR, dpo_args, lora_config, trainer_class  # noqa: E402


def peft_names(model_dir, cfg):
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(model_dir), lora_config(cfg))
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("dpo"))


def test_lora_never_touches_the_vision_tower(llava):
    scoped = peft_names(llava, TrainConfig(model=str(llava)))
    assert scoped and all("lora_" in n and "language_model" in n for n in scoped)
    assert not any("vision_tower" in n for n in scoped)
    # PEFT alone matches suffixes: the CLIP tower's q_proj/k_proj/v_proj would be adapted too.
    unscoped = peft_names(llava, TrainConfig(model=str(llava), lora=LoraConfig(scope="all")))
    assert any("vision_tower" in n for n in unscoped)


def test_projector_trains_at_its_own_learning_rate_and_the_vision_tower_stays(llava, tmp_path):
    import pyarrow.dataset as pads
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipelines.train.data import hf_dataset, to_trl_records
    torch.manual_seed(0)
    cfg = TrainConfig(model=str(llava), projector_lr=5e-3, learning_rate=1e-3, max_steps=2, per_device_batch_size=2,
                      lr_scheduler_type="constant", warmup_ratio=0.0, report_to=["none"], save_steps=100,
                      gradient_checkpointing=False, lora=LoraConfig(dropout=0.0))
    data = make_pairs_parquet(tmp_path / "pairs", n=8, files=1)
    rows = [{k: v for k, v in r.items() if k != "pair_id"}
            for r in to_trl_records(pads.dataset(str(data)).to_table().sort_by("pair_id"))]
    model = AutoModelForImageTextToText.from_pretrained(llava)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_class(cfg)(model=model, args=dpo_args(cfg, str(tmp_path / "hf"), use_cpu=True),
                                 train_dataset=hf_dataset(rows), peft_config=lora_config(cfg),
                                 processing_class=AutoProcessor.from_pretrained(llava))
    trainer.train()
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [1e-3, 5e-3]
    after = dict(trainer.model.named_parameters())
    projector = [n for n in after if PROJECTOR in n and "modules_to_save" in n]
    assert projector and all(after[n].requires_grad for n in projector)
    base = {n.replace("base_model.model.", "").replace(".modules_to_save.default", ""): p for n, p in after.items()}
    assert any(not torch.equal(before[n], base[n]) for n in before if PROJECTOR in n)        # it learned
    assert all(torch.equal(before[n], base[n]) for n in before if "vision_tower" in n)      # frozen
    trainer.save_model(str(tmp_path / "adapter"))
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert not any("vision_tower" in k for k in keys) and any(PROJECTOR in k for k in keys)


@pytest.mark.parametrize("workers,per_device,steps", [(1, 2, 4), (2, 2, 2), (4, 2, 1), (2, 1, 4)])
def test_the_global_batch_follows_the_recipe_not_the_worker_count(workers, per_device, steps):
    from cluster.resources import WorkersConfig
    cfg = TrainConfig(global_batch_size=8, per_device_batch_size=per_device, workers=WorkersConfig(num_workers=workers))
    assert cfg.validate() == []
    assert cfg.accumulation_steps(workers) == steps
    assert dpo_args(cfg, "/tmp/x", world_size=workers, use_cpu=True).gradient_accumulation_steps == steps
    bad = TrainConfig(global_batch_size=6, per_device_batch_size=4, workers=WorkersConfig(num_workers=1))
    assert [p.key for p in bad.validate()] == ["train.global_batch_size"]


def test_training_records_are_one_copy_built_batch_by_batch_and_memory_mapped(tmp_path):
    """What every Ray Train worker reads: ONE Arrow copy of the usable pairs (about their image bytes, written
    BATCH_ROWS rows at a time, nothing else on disk), in pair_id order whatever the files' order, bad rows
    dropped and counted, images still PNG bytes decoded when drawn, memory-mapped rather than held."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.table import MemoryMappedTable

    from benchmarks.scale import noise_png
    from pipelines.train.data import (
        BATCH_ROWS,
        build_trl_dataset,
        load_records,
        parquet_files,
        row_problem,
    )
    data = make_pairs_parquet(tmp_path / "made", n=3 * BATCH_ROWS, files=1, bad_rows=2)
    table = pq.read_table(next(data.glob("*.parquet")))
    rng = np.random.default_rng(0)
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array([noise_png(rng, 40) for _ in range(table.num_rows)], pa.binary()))
    table = table.take(rng.permutation(table.num_rows))     # files and rows out of pair_id order
    (tmp_path / "pairs").mkdir()
    for i, part in enumerate(np.array_split(np.arange(table.num_rows), 3)):
        pq.write_table(table.take(part), tmp_path / "pairs" / f"part-{i}.parquet")

    dropped = build_trl_dataset(parquet_files(str(tmp_path / "pairs")), tmp_path / "data")
    assert dropped == {"chosen == rejected": 1, "empty question": 1}
    rows = sorted(table.to_pylist(), key=lambda r: r["pair_id"])
    good = [r for r in rows if row_problem(r) is None]
    image_bytes = sum(len(r["image"]) for r in good)
    on_disk = {str(f.relative_to(tmp_path / "data")): f.stat().st_size
               for f in (tmp_path / "data").rglob("*") if f.is_file()}
    assert sorted(on_disk) == ["dropped.json", "records/order.arrow", "records/records.arrow"]
    assert image_bytes < sum(on_disk.values()) < 1.15 * image_bytes              # one copy, not three

    ds = load_records(tmp_path / "data")
    assert len(ds) == 3 * BATCH_ROWS and isinstance(ds.data, MemoryMappedTable)
    assert [r["chosen"][0]["content"][0]["text"] for r in ds.select_columns(["chosen"])] == [
        r["chosen"] for r in good]
    with pa.memory_map(str(tmp_path / "data" / "records" / "records.arrow")) as f:
        assert max(b.num_rows for b in pa.ipc.open_stream(f)) <= BATCH_ROWS     # written a batch at a time
    assert ds.features["images"].feature.decode
    from actors.common.runtime import open_png
    assert ds[5]["images"][0].size == (40, 40) and ds[5]["images"][0].tobytes() == open_png(good[5]["image"]).tobytes()


def test_train_dpo_reaches_the_dpo_config_beside_the_recipe():
    from conftest import ROOT

    from pipelines.config import load_config
    plain = load_config(ROOT / "configs" / "tiny.yaml").train
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "train.dpo.ld_alpha=0.5", "train.dpo.loss_type=[sigmoid, bco_pair]", "train.dpo.loss_weights=[1.0, 0.5]",
        "train.dpo.disable_tqdm=false"]).train
    args = dpo_args(cfg, "/tmp/x", world_size=2, use_cpu=True)
    assert (args.ld_alpha, args.loss_type, args.loss_weights, args.disable_tqdm) == \
        (0.5, ["sigmoid", "bco_pair"], [1.0, 0.5], False)
    # the recipe's own fields are still what it says
    assert (args.beta, args.learning_rate, args.per_device_train_batch_size, args.max_length, args.output_dir) == \
        (cfg.beta, cfg.learning_rate, cfg.per_device_batch_size, None, "/tmp/x")
    base = dpo_args(plain, "/tmp/x", world_size=2, use_cpu=True)
    assert (base.ld_alpha, base.loss_type, base.loss_weights, base.disable_tqdm) == (None, ["sigmoid"], None, True)


def test_a_train_dpo_loss_list_trains(llava, tmp_path):
    """Two steps with `train.dpo: {loss_type: [sigmoid, bco_pair], loss_weights: [1.0, 0.5]}`. The adapter starts
    as a no-op (policy = reference), so step 1's loss is log 2 (sigmoid) + 0.5 x 2 log 2 (bco_pair): 2 log 2, where
    the recipe's sigmoid alone gives log 2."""
    import math

    import pyarrow.dataset as pads
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipelines.train.data import hf_dataset, to_trl_records
    torch.manual_seed(0)
    cfg = TrainConfig(model=str(llava), learning_rate=1e-3, max_steps=2, per_device_batch_size=2,
                      lr_scheduler_type="constant", warmup_ratio=0.0, report_to=["none"], save_steps=100,
                      gradient_checkpointing=False, lora=LoraConfig(dropout=0.0),
                      dpo={"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1.0, 0.5]})
    assert cfg.validate() == []
    data = make_pairs_parquet(tmp_path / "pairs", n=4, files=1)
    rows = [{k: v for k, v in r.items() if k != "pair_id"}
            for r in to_trl_records(pads.dataset(str(data)).to_table().sort_by("pair_id"))]
    trainer = trainer_class(cfg)(model=AutoModelForImageTextToText.from_pretrained(llava),
                                 args=dpo_args(cfg, str(tmp_path / "hf"), use_cpu=True),
                                 train_dataset=hf_dataset(rows), peft_config=lora_config(cfg),
                                 processing_class=AutoProcessor.from_pretrained(llava))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert losses[0] == pytest.approx(2 * math.log(2), abs=1e-3)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)   # the adapter moved off its zero start
