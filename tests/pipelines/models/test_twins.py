"""Twins of the paper's models: the architecture classes and loading paths of the real checkpoints, run through
the project's own stage classes (no Ray)."""
from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image


def png(w, h, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def test_sd3_twin_is_an_sd3_pipeline_and_renders_through_the_image_stage(twin_models):
    from actors.images import ImagesConfig, ImageSynthesis
    from actors.prompts import candidate_seed
    stage = ImageSynthesis(ImagesConfig(model=str(twin_models["sd3"]), guidance_scales=[5.0, 7.0], steps=2,
                                        height=64, width=64))
    pipe = stage.pipe
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and pipe.vae.config.latent_channels == 16
    assert [type(e).__name__ for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)] == \
        ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    out = stage(pa.table({"prompt_id": ["p1"], "image_prompt": ["a red dog on a table"]}))
    images = out.column("candidate_images")[0].as_py()
    assert len(images) == 2 and Image.open(io.BytesIO(images[0])).size == (64, 64)
    assert out.column("candidate_seeds")[0].as_py() == [candidate_seed("p1", k) for k in range(2)]


@pytest.mark.parametrize("name,family", [("llava-next-mistral-7b", "MistralConfig"),
                                         ("llava-next-vicuna-13b", "LlamaConfig")])
def test_llava_next_twins_answer_through_the_sampling_stage_with_any_res_tiles(twin_models, name, family):
    from actors.sampling import AnswerSampler, SamplerConfig
    stage = AnswerSampler(SamplerConfig(model=str(twin_models[name]), name=name, n=2, temperature=1.0,
                                        max_new_tokens=6))
    model, processor = stage.backend.model, stage.backend.processor
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert type(processor).__name__ == "LlavaNextProcessor" and type(model.config.text_config).__name__ == family
    # any-res: an 80x48 image is tiled (base view + grid tiles), a square one is not
    wide = processor.image_processor(images=[Image.open(io.BytesIO(png(80, 48)))], return_tensors="pt")
    square = processor.image_processor(images=[Image.open(io.BytesIO(png(32, 32)))], return_tensors="pt")
    assert wide["pixel_values"].shape[1] > square["pixel_values"].shape[1] >= 1
    out = stage(pa.table({"image": [png(80, 48), png(32, 32)], "question": ["What is this?", "Describe it."],
                          "pair_key": ["k1", "k2"], "prompt_id": ["p1", "p2"]}))
    assert out.column("error").to_pylist() == [None, None]
    assert [len(a) for a in out.column("answers").to_pylist()] == [2, 2]


def test_imagereward_twin_has_imagereward_files_and_selects_through_the_selection_stage(twin_models):
    import torch

    from actors.select import ImageSelection, SelectionConfig
    folder = twin_models["imagereward"]
    assert {"ImageReward.pt", "med_config.json", "vocab.txt"} <= {p.name for p in folder.iterdir()}
    keys = torch.load(folder / "ImageReward.pt", weights_only=True).keys()
    assert {"blip.visual_encoder.blocks.1.attn.qkv.weight", "blip.text_encoder.encoder.layer.1.crossattention."
            "self.key.weight", "mlp.layers.7.weight"} <= set(keys)   # BLIP's and ImageReward's own names
    stage = ImageSelection(SelectionConfig(scorer="imagereward", model=str(folder)))
    net = stage.scorer.model.net
    assert (type(net["vision"]).__name__, type(net["text"]).__name__) == ("BlipVisionModel", "BlipTextModel")
    cands = [[png(64, 64, (200, 30, 30)), png(80, 48, (20, 20, 220)), png(48, 80, (240, 240, 240))],
             [png(64, 64, (10, 120, 10)), png(64, 64, (250, 200, 0))]]
    prompts = ["a red dog on a table", "a yellow car"]
    out = stage(pa.table({"image_prompt": prompts, "candidate_images": cands,
                          "candidate_seeds": [[1, 2, 3], [4, 5]], "candidate_guidance": [[5.0, 7.0, 9.0], [5.0, 7.0]]}))
    scores = out.column("candidate_scores").to_pylist()
    alone = [[stage.scorer.score([Image.open(io.BytesIO(b)).convert("RGB")], [p])[0] for b in row]
             for row, p in zip(cands, prompts)]
    assert [len(s) for s in scores] == [3, 2] and scores[0] == pytest.approx(alone[0], abs=1e-5)
    assert scores[1] == pytest.approx(alone[1], abs=1e-5) and len(set(scores[0])) == 3
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    assert out.column("image").to_pylist() == [row[b] for row, b in zip(cands, best)]
    assert out.column("seed").to_pylist() == [[1, 2, 3][best[0]], [4, 5][best[1]]]


def test_armorm_twin_loads_remote_code_scores_and_batches_like_one_at_a_time(twin_models):
    from actors.rewards import RewardsConfig, TextReward
    reward = TextReward(RewardsConfig(text_model=str(twin_models["armorm"]), trust_remote_code=True))
    model = reward.model
    assert type(model).__name__ == "LlamaForRewardModelWithGating" and reward.batched
    # ArmoRM's layout: 19 objectives mixed by a 3-hidden-layer gating network through an identity transform
    assert model.regression_layer.out_features == 19 and len(model.gating.layers) == 4
    assert torch_equal_eye(model.reward_transform_matrix)
    questions = ["What is this?", "Describe the image in detail please.", "Is there a dog?"]
    answers = ["A dog.", "There are two cats sitting in a green park next to a wooden bench.", "No."]
    batched = reward.score(questions, answers)
    single = [reward.score([q], [a])[0] for q, a in zip(questions, answers)]
    assert batched == pytest.approx(single, abs=1e-5) and len(set(batched)) == 3
    # the pooled token is the last before the first pad id, which -1 wraps to the end: left padding works too
    reward.tok.padding_side = "left"
    assert reward.score(questions, answers) == pytest.approx(single, abs=1e-5)


def torch_equal_eye(m) -> bool:
    import torch
    return torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype))


def test_armorm_style_model_whose_pad_id_is_in_its_chat_template_is_refused_at_load(twin_models, tmp_path):
    import json
    import shutil

    from actors.rewards import RewardsConfig, TextReward
    folder = tmp_path / "armorm-pad-eos"
    shutil.copytree(twin_models["armorm"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = config["eos_token_id"]   # "</s>", which the chat template writes after an answer
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pad_token_id 2 .*'</s>'.* occurs in its own chat template"):
        TextReward(RewardsConfig(text_model=str(folder), trust_remote_code=True))
