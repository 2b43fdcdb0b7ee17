"""`images.store_size`: the stored image is scaled to the policy processor's size; `images.keep_render` keeps the
chosen full render beside it; DPO trains on the stored images."""
from __future__ import annotations

import pyarrow as pa
import pytest

from actors.common.runtime import open_png
from actors.images import ImagesConfig, ImageSynthesis, stored
from actors.select import ImageSelection, SelectionConfig

PROMPTS = pa.table({"prompt_id": ["p1", "p2"], "image_prompt": ["a red circle at the top left on a gray background",
                                                         "two blue squares on a gray background"]})


def chosen(store_size=None, keep_render=False, size=96):
    cfg = ImagesConfig(backend="shapes", guidance_scales=[5.0, 7.0], height=size, width=size,
                       store_size=store_size, keep_render=keep_render)
    return ImageSelection(SelectionConfig(scorer="none"))(ImageSynthesis(cfg)(PROMPTS)), cfg


def test_the_stored_image_has_the_store_size_and_keep_render_keeps_the_full_render():
    full, _ = chosen()
    small, _ = chosen(store_size=40)
    kept, _ = chosen(store_size=40, keep_render=True)
    assert {open_png(b).size for b in full.column("image").to_pylist()} == {(96, 96)}
    assert {open_png(b).size for b in small.column("image").to_pylist()} == {(40, 40)}
    assert "image_render" not in small.column_names and "candidate_renders" not in small.column_names
    assert kept.column("image").to_pylist() == small.column("image").to_pylist()
    assert kept.column("image_render").to_pylist() == full.column("image").to_pylist()  # the render's own bytes
    assert "candidate_renders" not in kept.column_names


def test_store_size_keeps_the_aspect_never_upscales_and_is_validated():
    from PIL import Image
    assert stored(Image.new("RGB", (1024, 768)), 336).size == (448, 336)
    assert stored(Image.new("RGB", (200, 200)), 336).size == (200, 200)
    assert stored(Image.new("RGB", (512, 512)), None).size == (512, 512)
    assert [p.key for p in ImagesConfig(backend="shapes", store_size=4).validate()] == ["images.store_size"]
    assert ImagesConfig(backend="shapes", store_size=None).validate() == []


@pytest.mark.parametrize("name", ["paper.yaml", "paper-1node.yaml"])
def test_the_paper_configs_store_the_policy_size(name):
    from conftest import ROOT

    from pipelines.config import load_config
    cfg = load_config(ROOT / "configs" / name, ["output_dir=x"])
    assert cfg.images.store_size == 336 and not cfg.images.keep_render
    assert cfg.data_dict()["images"]["store_size"] == 336  # part of the data hash


def test_dpo_trains_on_the_stored_images(tiny_models, tmp_path):
    """One DPO step of the tiny LLaVA on pairs whose images were stored at 40 px from 96 px renders."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipelines.train.config import TrainConfig
    from pipelines.train.data import hf_dataset, to_trl_records
    from pipelines.train.dpo import dpo_args, lora_config, trainer_class
    rows, _ = chosen(store_size=40)
    n = rows.num_rows
    pairs = pa.table({"pair_id": ["a", "b"], "image": rows.column("image"), "question": ["What is shown?"] * n,
                      "chosen": ["a red circle", "a dog"], "rejected": ["a green car", "a cat"]})
    records = [{k: v for k, v in r.items() if k != "pair_id"} for r in to_trl_records(pairs)]
    assert len(records) == 2 and records[0]["images"][0].size == (40, 40)
    llava = tiny_models["llava"]
    cfg = TrainConfig(model=str(llava), max_steps=1, per_device_batch_size=2, report_to=["none"], save_steps=100,
                      warmup_ratio=0.0, gradient_checkpointing=False)
    torch.manual_seed(0)
    trainer = trainer_class(cfg)(model=AutoModelForImageTextToText.from_pretrained(llava),
                                 args=dpo_args(cfg, str(tmp_path / "hf"), use_cpu=True),
                                 train_dataset=hf_dataset(records), peft_config=lora_config(cfg),
                                 processing_class=AutoProcessor.from_pretrained(llava))
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(lora[n], after[n]) for n in lora)  # the step changed the adapter
