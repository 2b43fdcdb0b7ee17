"""A config's dtype reaches every weight of every model a stage loads: the twins of the paper's models loaded in
bfloat16 (which CPUs run), each parameter checked, then each model run once in it."""
from __future__ import annotations

import math

import pytest

BF16 = "bfloat16"


def dtypes(module) -> dict[str, set]:
    """{top-level submodule: the dtype names of its parameters}. Parameters only: buffers such as rotary
    embeddings' inv_freq are computed at init, in float32 on purpose, not loaded."""
    out: dict[str, set] = {}
    for name, t in module.named_parameters():
        out.setdefault(name.split(".")[0], set()).add(str(t.dtype).removeprefix("torch."))
    assert out, "no parameters"
    return out


def all_of(module, dtype: str) -> bool:
    return all(v == {dtype} for v in dtypes(module).values())


@pytest.fixture(scope="module")
def images(twin_models):
    from actors.images import ImagesConfig, ImageSynthesis
    return ImageSynthesis(ImagesConfig(model=str(twin_models["sd3"]), dtype=BF16, device="cpu", steps=2,
                                       height=32, width=32, batch_size=1, guidance_scales=[5.0]))


def test_sd3_every_component_in_the_requested_dtype_and_renders(images):
    import torch
    pipe = images.pipe
    models = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert sorted(models) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]
    for name, model in models.items():
        assert all_of(model, BF16), (name, dtypes(model))
    image = images.render("a red cube on a table", 5.0, 0)
    assert image.size == (32, 32) and len(set(image.getdata())) > 1   # rendered in bf16, not a blank image


@pytest.mark.parametrize("name", ["llava-next-mistral-7b", "llava"])
def test_llava_vision_tower_projector_and_lm_in_the_requested_dtype(twin_models, name):
    from PIL import Image

    from actors.sampling import SamplerConfig, TransformersBackend
    backend = TransformersBackend(SamplerConfig(model=str(twin_models[name]), dtype=BF16, device="cpu",
                                                max_new_tokens=3), threads=1)
    parts = dtypes(backend.model.model)
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= set(parts)
    assert all(v == {BF16} for v in parts.values()), parts
    assert all_of(backend.model, BF16)   # the LM head too
    answers = backend.answer([Image.new("RGB", (32, 32), (200, 30, 30))], ["What is this?"])
    assert len(answers) == 1 and len(answers[0]) == 1


def test_reward_model_and_clip_term_in_the_requested_dtype(twin_models):
    from PIL import Image

    from actors.rewards import RewardsConfig, RewardScorer, load_vocab
    cfg = RewardsConfig(text_model=str(twin_models["armorm"]), clip_model=str(twin_models["clip"]), dtype=BF16,
                        device="cpu", trust_remote_code=True, weights={"text": 1.0, "clip": 1.0})
    scorer = RewardScorer(cfg, load_vocab(cfg))
    assert all_of(scorer.text.model, BF16), dtypes(scorer.text.model)
    assert all_of(scorer.clip.model, BF16), dtypes(scorer.clip.model)
    text = scorer.text.score(["Is there a cat?", "Is there a cat?"], ["Yes.", "No, a dog."])
    clip = scorer.clip.score([Image.new("RGB", (32, 32), "red")] * 2, ["a red square", "a cat"])
    assert len(text) == len(clip) == 2 and all(math.isfinite(v) for v in text + clip)


@pytest.mark.parametrize("scorer", ["imagereward", "clip"])
def test_image_scorer_in_the_requested_dtype(twin_models, scorer):
    from PIL import Image

    from actors.select import ImageSelection, SelectionConfig
    sel = ImageSelection(SelectionConfig(scorer=scorer, model=str(twin_models[scorer]), dtype=BF16, device="cpu"))
    net = sel.scorer.model.net if scorer == "imagereward" else sel.scorer.model
    assert all_of(net, BF16), dtypes(net)
    if scorer == "imagereward":
        assert {"vision", "text", "mlp"} == set(dtypes(net))
    scores = sel.scorer.score([Image.new("RGB", (64, 48), "red"), Image.new("RGB", (48, 64), "blue")],
                              ["a red square", "a blue square"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_image_scorer_default_stays_float32_and_unknown_dtype_is_a_config_problem(twin_models):
    from actors.select import ImageSelection, SelectionConfig
    sel = ImageSelection(SelectionConfig(scorer="imagereward", model=str(twin_models["imagereward"]), device="cpu"))
    assert all_of(sel.scorer.model.net, "float32")
    problems = SelectionConfig(model="m", dtype="fp8").validate()
    assert [p.key for p in problems] == ["selection.dtype"]
