"""`eval pope` / `eval mmhal` defaults: the answering model runs in the dtype it was saved in (or --dtype), on a
GPU when the machine has one. Checked without Ray: the sampler and pool the commands build."""
from __future__ import annotations

import json
import shutil

import pytest

from actors.common.errors import InputError
from pipelines.cli import build_parser
from pipelines.cli.eval import eval_pool
from pipelines.evaluate.answer import check_pope_inputs
from pipelines.evaluate.judge import check_mmhal_inputs


@pytest.fixture(scope="module")
def bf16_llava(tiny_models, tmp_path_factory):
    """The tiny LLaVA saved in bfloat16, as the hub's 7B checkpoints are saved in a half precision."""
    from transformers import AutoModelForImageTextToText
    out = tmp_path_factory.mktemp("bf16") / "llava"
    shutil.copytree(tiny_models["llava"], out)
    import torch
    AutoModelForImageTextToText.from_pretrained(tiny_models["llava"], dtype=torch.bfloat16).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("evalsets")
    (root / "images").mkdir()
    Image.new("RGB", (32, 32), "red").save(root / "images" / "red.png")
    (root / "q.jsonl").write_text(json.dumps({"question_id": 1, "image": "red.png", "label": "no",
                                              "text": "Is there a cat in the image?"}) + "\n")
    (root / "t.json").write_text(json.dumps([{
        "question_type": "attribute", "question_topic": "test", "image_id": "red", "image_src": "x/red.png",
        "image_content": ["square"], "question": "What colour is it?", "gt_answer": "Red.", "model_answer": ""}]))
    return root


def test_pope_and_mmhal_answer_in_the_models_saved_dtype(bf16_llava, tiny_models, inputs):
    from actors.sampling import TransformersBackend
    _, sampler = check_pope_inputs(inputs / "q.jsonl", inputs / "images", str(bf16_llava))
    assert sampler.dtype == "bfloat16"
    *_, sampler2 = check_mmhal_inputs(inputs / "t.json", inputs / "images", None, "http://127.0.0.1:9", None,
                                      str(bf16_llava))
    assert sampler2.dtype == "bfloat16"
    # the backend then loads every weight in it
    model = TransformersBackend(sampler, threads=1).model
    assert {str(p.dtype) for p in model.parameters()} == {"torch.bfloat16"}
    # a float32 checkpoint stays float32; --dtype overrides either
    assert check_pope_inputs(inputs / "q.jsonl", inputs / "images", str(tiny_models["llava"]))[1].dtype == "float32"
    assert check_pope_inputs(inputs / "q.jsonl", inputs / "images", str(bf16_llava),
                             dtype="float16")[1].dtype == "float16"


def test_unreadable_model_config_is_an_input_error(inputs, tmp_path):
    with pytest.raises(InputError, match=r"field '--model': cannot read the model's config"):
        check_pope_inputs(inputs / "q.jsonl", inputs / "images", str(tmp_path))


def cli_args(inputs, *more):
    return build_parser().parse_args(["eval", "pope", "--questions", str(inputs / "q.jsonl"), "--image-dir",
                                      str(inputs / "images"), "--model", "m", *more])


def test_num_gpus_defaults_to_one_gpu_when_cuda_is_there(inputs, monkeypatch):
    import torch

    from cluster.resources import map_batches_kwargs
    args = cli_args(inputs)
    assert args.num_gpus is None and args.dtype is None
    assert not torch.cuda.is_available() and eval_pool(args).num_gpus == 0
    assert "num_gpus" not in map_batches_kwargs(eval_pool(args))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pool = eval_pool(args)
    assert pool.num_gpus == 1 and map_batches_kwargs(pool)["num_gpus"] == 1
    assert eval_pool(cli_args(inputs, "--num-gpus", "0.5")).num_gpus == 0.5   # given: as given
    assert eval_pool(cli_args(inputs, "--num-gpus", "0")).num_gpus == 0
    assert cli_args(inputs, "--dtype", "bfloat16").dtype == "bfloat16"


def test_the_runs_own_evaluation_loads_the_policy_in_its_saved_dtype(bf16_llava, tiny_models):
    from pipelines.evaluate.world import load_model
    assert {str(p.dtype) for p in load_model(str(bf16_llava)).model.parameters()} == {"torch.bfloat16"}
    assert {str(p.dtype) for p in load_model(str(tiny_models["llava"])).model.parameters()} == {"torch.float32"}
