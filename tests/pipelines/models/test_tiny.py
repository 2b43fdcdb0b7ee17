"""Tiny models: the hub's weight layout that vLLM's LLaVA loaders expect (the vLLM lane serves it)."""
from __future__ import annotations

import shutil

import pytest
import torch


@pytest.mark.parametrize("arch", ["llava", "llava-next"])
def test_hub_layout_renames_only_vision_weights_and_loads_the_same_model(tiny_models, tmp_path, arch):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from pipelines.models.tiny import to_hub_layout
    from pipelines.models.twins import llava_next
    folder = tmp_path / arch
    if arch == "llava":
        shutil.copytree(tiny_models["llava"], folder)
    else:
        folder.mkdir()
        llava_next(folder, 0, "llama")
    before = load_file(folder / "model.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    to_hub_layout(folder)
    after = load_file(folder / "model.safetensors")
    vision = [k for k in after if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert {k for k in after if not k.startswith("vision_tower.")} == {k for k in before if not k.startswith("vision_tower.")}
    assert len(after) == len(before)
    again, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    to_hub_layout(folder)   # idempotent: already hub names stay as they are
    assert load_file(folder / "model.safetensors").keys() == after.keys()
