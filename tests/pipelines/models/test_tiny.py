"""Tiny models: the hub's weight layout that vLLM's LLaVA loaders expect (the vLLM lane serves it)."""
from __future__ import annotations

import shutil

import pytest
import torch


def weights(folder) -> dict:
    from safetensors.torch import load_file
    return {k: v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


@pytest.mark.parametrize("arch", ["llava", "llava-next", "llava-sharded"])
def test_hub_layout_renames_only_vision_weights_and_loads_the_same_model(tiny_models, tmp_path, arch):
    from transformers import AutoModelForImageTextToText

    from pipelines.models.tiny import to_hub_layout
    from pipelines.models.twins import llava_next
    folder = tmp_path / arch
    if arch == "llava":
        shutil.copytree(tiny_models["llava"], folder)
    elif arch == "llava-next":
        folder.mkdir()
        llava_next(folder, 0, "llama")
    else:   # as a 7B merged model is saved: shards and an index
        AutoModelForImageTextToText.from_pretrained(tiny_models["llava"]).save_pretrained(folder, max_shard_size="200KB")
        assert len(list(folder.glob("*.safetensors"))) > 1
    before = weights(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    to_hub_layout(folder)
    after = weights(folder)
    vision = [k for k in after if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert {k for k in after if not k.startswith("vision_tower.")} == {k for k in before if not k.startswith("vision_tower.")}
    assert len(after) == len(before)
    again, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    to_hub_layout(folder)   # idempotent: already hub names stay as they are
    assert weights(folder).keys() == after.keys()
