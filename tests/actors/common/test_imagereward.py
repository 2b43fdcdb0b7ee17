"""ImageReward's checkpoint on transformers 5: scores equal image-reward 1.5's own code on the same twin checkpoint
(data/imagereward_golden.json, made by data/imagereward_reference.py in a transformers 4.46 venv)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def ir_twin(tmp_path_factory) -> Path:
    """The ImageReward twin as make_twins(seed=0) builds it (seed 15), alone."""
    from pipelines.models.tiny import build_models
    from pipelines.models.twins import TWINS
    return build_models(tmp_path_factory.mktemp("ir"), {"imagereward": TWINS["imagereward"]}, 0)["imagereward"]


@pytest.fixture(scope="module")
def scorer(ir_twin):
    from actors.common.imagereward import ImageRewardModel
    return ImageRewardModel(str(ir_twin))


def reference_cases():
    spec = importlib.util.spec_from_file_location("imagereward_reference", DATA / "imagereward_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)   # defines cases(); ImageReward itself is only imported by its main()
    return module.cases()


def test_scores_match_imagereward_own_code_on_the_twin_checkpoint(scorer):
    golden = json.loads((DATA / "imagereward_golden.json").read_text())
    assert golden["missing_keys"] == [] and golden["unexpected_keys"] == []   # the reference consumed it all
    pairs = reference_cases()
    assert [p for _, p in pairs] == golden["prompts"]
    images = [im for im, _ in pairs]
    assert scorer.score(images, [p for _, p in pairs]) == pytest.approx(golden["scores"], abs=1e-5)
    # inference_rank: one prompt against every image
    assert scorer.score(images, [pairs[0][1]] * len(images)) == pytest.approx(golden["first_prompt_all_images"],
                                                                              abs=1e-5)
    assert len({round(s, 4) for s in golden["scores"]}) == len(pairs)   # the twin tells images apart


def test_batched_scores_equal_one_at_a_time_and_repeat_exactly(scorer):
    pairs = reference_cases()
    images, prompts = [im for im, _ in pairs], [p for _, p in pairs]
    batched = scorer.score(images, prompts)
    assert len(batched) == len(pairs)
    assert batched == pytest.approx([scorer.score([im], [p])[0] for im, p in pairs], abs=1e-5)
    assert scorer.score(images, prompts) == batched


def test_every_checkpoint_key_is_consumed_and_unknown_keys_fail(ir_twin):
    import torch

    from actors.common.imagereward import UNUSED, build, map_keys, sizes
    state = torch.load(ir_twin / "ImageReward.pt", weights_only=True)
    mapped = map_keys(state)
    med = json.loads((ir_twin / "med_config.json").read_text())
    net = build(med, sizes(mapped))
    result = net.load_state_dict(mapped, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    skipped = [k for k in state if k.startswith(UNUSED)]
    assert len(mapped) + len(skipped) == len(state) and len(skipped) == 5   # 2 projections x (w, b) + position_ids
    with pytest.raises(ValueError, match="unexpected keys.*blip.itm_head"):
        map_keys({**state, "blip.itm_head.weight": torch.zeros(2, 32)})
    del mapped["vision.encoder.layers.1.self_attn.qkv.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict(mapped, strict=True)


def test_model_names_resolve_to_files_or_fail_in_one_line(ir_twin, tmp_path):
    from actors.common.imagereward import TOKENIZER, resolve
    ckpt, med, tok = resolve(str(ir_twin))
    assert (ckpt.name, med.name, tok) == ("ImageReward.pt", "med_config.json", str(ir_twin))
    assert resolve(str(ckpt))[0] == ckpt                       # a checkpoint file, as ImageReward.load takes
    (tmp_path / "ImageReward.pt").write_bytes((ir_twin / "ImageReward.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match="med_config.json not found"):
        resolve(str(tmp_path))
    (tmp_path / "med_config.json").write_text((ir_twin / "med_config.json").read_text())
    assert resolve(str(tmp_path))[2] == TOKENIZER             # no tokenizer files: bert-base-uncased, as ImageReward
    with pytest.raises(FileNotFoundError, match="ImageReward-v1.0"):
        resolve("ImageReward-v2")
