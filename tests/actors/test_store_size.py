"""`images.store_size`: every stage (selection, samplers, rewards) sees the full render and the image is scaled to
the policy processor's size only as the row leaves the chain for storage; `images.keep_render` stores the chosen
full render beside it; DPO trains on the stored images."""
from __future__ import annotations

import pyarrow as pa
import pytest

from actors.common.runtime import open_png, png_bytes
from actors.images import ImagesConfig, ImageSynthesis, stored, stored_png
from actors.pairs import PairBuilder, PairsConfig
from actors.select import ImageSelection, SelectionConfig

PROMPTS = pa.table({"prompt_id": ["p1", "p2"], "image_prompt": ["a red circle at the top left on a gray background",
                                                         "two blue squares on a gray background"]})


def chosen(store_size=None, keep_render=False, size=96):
    """Rendered, selected and readied for storage by PairBuilder (stand-in answers and rewards in between)."""
    cfg = ImagesConfig(backend="shapes", guidance_scales=[5.0, 7.0], height=size, width=size,
                       store_size=store_size, keep_render=keep_render)
    return PairBuilder(PairsConfig(), images=cfg)(with_answers(selected(cfg))), cfg


def selected(cfg):
    return ImageSelection(SelectionConfig(scorer="none"))(ImageSynthesis(cfg)(PROMPTS))


def with_answers(rows):
    n = rows.num_rows
    return rows.append_column("pair_key", pa.array([f"k{i}" for i in range(n)])).append_column(
        "answers", pa.array([["a circle", "a square"]] * n)).append_column(
        "answer_models", pa.array([["m1", "m2"]] * n)).append_column(
        "reward", pa.array([[1.0, 0.0]] * n)).append_column(
        "question", pa.array(["What is shown?"] * n)).append_column(
        "hallucinated", pa.array([[[], []]] * n, pa.list_(pa.list_(pa.string()))))


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
    assert full.column("pair_id").to_pylist() == ["k0", "k1"]   # the pairs are built as before


def test_every_stage_sees_the_full_render_and_only_the_stored_image_is_scaled(tiny_models, coco_vocab, tmp_path,
                                                                              monkeypatch):
    """The run's own chain (steps of actors.contract.STAGES, in process): tiny CLIP selection, two tiny LLaVA
    samplers and the CLIP reward on 96-px shapes renders, images.store_size 40. Each stage's image decoding is
    recorded: all see 96 px; the rows leave with a 40-px `image` and the 96-px chosen render in `image_render`."""
    from conftest import tiny_config

    import actors.rewards
    import actors.sampling
    import actors.select
    from pipelines.generate.chain import Chain, prompt_table, steps
    seen = {}
    for module in (actors.select, actors.sampling, actors.rewards):
        def recording(data, _name=module.__name__.split(".")[-1], _open=module.open_png):
            img = _open(data)
            seen.setdefault(_name, []).append(img.size)
            return img
        monkeypatch.setattr(module, "open_png", recording)
    cfg = tiny_config(tiny_models, tmp_path / "run", **{"images.backend": "shapes", "images.height": 96,
                                                        "images.width": 96, "images.store_size": 40,
                                                        "images.keep_render": "true"})
    batch = prompt_table([{"prompt_id": p, "image_prompt": t, "instructions": ["What is shown?", "Describe it."],
                           "gt_objects": []} for p, t in zip(PROMPTS.column("prompt_id").to_pylist(),
                                                             PROMPTS.column("image_prompt").to_pylist())])
    for step in steps(cfg, coco_vocab):
        batch = Chain(step.parts)(batch)
    rows = batch.to_pylist()
    assert len(rows) == 4 and all(r["error"] is None for r in rows)   # 2 prompts x 2 questions
    assert seen["select"] == [(96, 96)] * 2 * 4                        # 4 candidates a prompt
    assert seen["sampling"] == [(96, 96)] * 4 * 2                      # each row, by each of the 2 samplers
    assert seen["rewards"] == [(96, 96)] * 4                           # the CLIP image-answer term
    assert {open_png(r["image"]).size for r in rows} == {(40, 40)}
    assert {open_png(r["image_render"]).size for r in rows} == {(96, 96)}
    assert all(r["image"] == stored_png(r["image_render"], 40) for r in rows)
    assert "candidate_renders" not in batch.column_names


def test_rows_that_failed_upstream_are_stored_at_the_store_size_too():
    """A row with an error passes PairBuilder's pairing untouched but leaves the chain scaled like the others;
    no store_size and no keep_render leave the rows as they are; bytes that are no PNG pass unchanged."""
    rows = selected(ImagesConfig(backend="shapes", guidance_scales=[5.0, 7.0], height=96, width=96))
    failed = with_answers(rows).set_column(rows.column_names.index("error"), "error",
                                           pa.array([None, "rewards: ValueError: x"], pa.string()))
    out = PairBuilder(PairsConfig(), images=ImagesConfig(backend="shapes", store_size=40))(failed)
    assert {open_png(b).size for b in out.column("image").to_pylist()} == {(40, 40)}
    assert out.column("error").to_pylist() == [None, "rewards: ValueError: x"]
    assert out.column("pair_id").to_pylist() == ["k0", None]         # the failed row got no pair
    assert "image_render" not in out.column_names
    same = PairBuilder(PairsConfig(), images=ImagesConfig(backend="shapes"))(with_answers(rows))
    assert same.column("image").to_pylist() == rows.column("image").to_pylist()
    assert stored_png(b"\x00not a png", 40) == b"\x00not a png" and stored_png(None, 40) is None


def test_store_size_keeps_the_aspect_never_upscales_and_is_validated():
    from PIL import Image
    assert stored(Image.new("RGB", (1024, 768)), 336).size == (448, 336)
    assert stored(Image.new("RGB", (200, 200)), 336).size == (200, 200)
    assert stored(Image.new("RGB", (512, 512)), None).size == (512, 512)
    small = png_bytes(Image.new("RGB", (200, 300)))
    assert stored_png(small, 336) is small and open_png(stored_png(small, 100)).size == (100, 150)
    assert [p.key for p in ImagesConfig(backend="shapes", store_size=4).validate()] == ["images.store_size"]
    assert ImagesConfig(backend="shapes", store_size=None).validate() == []


@pytest.mark.parametrize("name", ["paper.yaml", "paper-1node.yaml"])
def test_the_paper_configs_store_the_policy_size(name):
    from conftest import ROOT

    from pipelines.config import load_config
    cfg = load_config(ROOT / "configs" / name, ["output_dir=x"])
    assert cfg.images.store_size == 336 and not cfg.images.keep_render
    assert cfg.data_dict()["images"]["store_size"] == 336  # part of the data hash
    # The authors' 1,000 answer tokens; a vLLM sequence holds them after the 2,928 tokens LLaVA-1.6 makes of the
    # full 1024-px render (2 x 2 tiles + overview) and the question in its chat template (64 in pipelines/plan.py)
    assert [s.max_new_tokens for s in cfg.samplers] == [1000] * 3
    assert all(s.max_model_len >= 2928 + 64 + s.max_new_tokens for s in cfg.samplers)


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
