"""images.drop_t5 / vae_tiling / vae_slicing / cpu_offload: each takes effect on the SD3 twin, is refused where it
cannot apply, and leaves configs that do not use them as they were (same data hash, same image bytes)."""
from __future__ import annotations

import pytest

from actors.common.runtime import png_bytes
from actors.images import ImagesConfig, ImageSynthesis

SMALL = dict(steps=2, height=32, width=32, batch_size=2, guidance_scales=[5.0], device="cpu")
PROMPTS, SEEDS = ["a red cube on a table", "two blue spheres"], [3, 4]


def synth(model, **options) -> ImageSynthesis:
    return ImageSynthesis(ImagesConfig(model=str(model), **{**SMALL, **options}))


def test_drop_t5_loads_sd3_without_t5_and_still_renders(twin_models):
    full, light = synth(twin_models["sd3"]), synth(twin_models["sd3"], drop_t5=True)
    assert full.pipe.text_encoder_3 is not None and full.pipe.tokenizer_3 is not None
    assert light.pipe.text_encoder_3 is None and light.pipe.tokenizer_3 is None
    a, b = full.render_batch(PROMPTS, SEEDS, 5.0), light.render_batch(PROMPTS, SEEDS, 5.0)
    assert [im.size for im in b] == [(32, 32)] * 2
    # T5's part of the prompt embedding is zeros without it: other images from the same seeds
    assert [png_bytes(im) for im in a] != [png_bytes(im) for im in b]


def test_vae_tiling_and_slicing_are_set_and_render(twin_models):
    plain = synth(twin_models["sd3"])
    assert (plain.pipe.vae.use_tiling, plain.pipe.vae.use_slicing) == (False, False)
    for option in ("vae_tiling", "vae_slicing"):
        s = synth(twin_models["sd3"], **{option: True})
        assert (s.pipe.vae.use_tiling, s.pipe.vae.use_slicing) == (option == "vae_tiling", option == "vae_slicing")
        assert [im.size for im in s.render_batch(PROMPTS, SEEDS, 5.0)] == [(32, 32)] * 2


def test_cpu_offload_is_refused_without_cuda(twin_models):
    with pytest.raises(ValueError, match="images.cpu_offload needs a CUDA GPU; this actor has cpu"):
        synth(twin_models["sd3"], cpu_offload=True)
    problems = ImagesConfig(model="m", device="cpu", cpu_offload=True).validate()
    assert [p.key for p in problems] == ["images.cpu_offload"]
    assert ImagesConfig(model="m", cpu_offload=True).validate() == []   # device auto: a GPU node decides


def test_drop_t5_on_a_pipeline_without_t5_and_options_on_shapes_are_refused(tiny_models):
    with pytest.raises(ValueError, match="images.drop_t5: .* has no text_encoder_3"):
        synth(tiny_models["sd"], drop_t5=True)
    problems = ImagesConfig(backend="shapes", vae_slicing=True, drop_t5=True).validate()
    assert [p.key for p in problems] == ["images.drop_t5", "images.vae_slicing"]


def test_defaults_keep_the_data_hash_and_the_image_bytes(tiny_models):
    from diffusers import DiffusionPipeline

    from pipelines.config import load_config
    from tests.conftest import ROOT
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert not {"drop_t5", "vae_tiling", "vae_slicing", "cpu_offload"} & set(tiny.data_dict()["images"])
    assert "dtype" not in tiny.data_dict()["selection"]
    off = load_config(ROOT / "configs" / "tiny.yaml", ["images.vae_tiling=false", "selection.dtype=float32"])
    assert off.hash() == tiny.hash()
    assert load_config(ROOT / "configs" / "tiny.yaml", ["images.vae_slicing=true"]).hash() != tiny.hash()
    # The options off, an image is what the plain diffusers load renders, byte for byte.
    ours = synth(tiny_models["sd"]).render_batch(PROMPTS, SEEDS, 5.0)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models["sd"])).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    import torch
    plain = pipe(prompt=PROMPTS, guidance_scale=5.0, num_inference_steps=2, height=32, width=32,
                 generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS]).images
    assert [png_bytes(im) for im in ours] == [png_bytes(im) for im in plain]


def test_shipped_configs_use_the_options_their_gpus_need():
    """paper.yaml's diffusion nodes are 24 GB A10Gs (and pairs-2k/9k run on them): SD3 with T5 offloaded, the VAE
    sliced. paper-1node's 80 GB cards need neither; paper-twin runs on CPU, where offloading cannot apply."""
    from pipelines.config import load_config
    from tests.conftest import ROOT
    want = {"paper": (True, True), "pairs-2k": (True, True), "pairs-9k": (True, True),
            "paper-1node": (False, False), "paper-twin": (False, True), "tiny": (False, False)}
    for name, (offload, slicing) in want.items():
        images = load_config(ROOT / "configs" / f"{name}.yaml").images
        assert (images.cpu_offload, images.vae_slicing, images.drop_t5, images.vae_tiling) == \
            (offload, slicing, False, False), name
