"""`synthalign plan` and GPU memory: weights by dtype, vLLM's KV cache, SD3's activations; shares that hold their
models, and a model that fits no GPU refused in one line."""
from __future__ import annotations

import pytest
from conftest import ROOT

from actors.common.errors import InputError
from actors.sampling import SamplerConfig
from pipelines.config import load_config
from pipelines.plan import make_plan, write_plan
from pipelines.plan_memory import (
    RUNTIME_GIB,
    GiB,
    images_need,
    memory_problems,
    pool_needs,
    sampler_need,
)

PAPER = ROOT / "configs" / "paper.yaml"
VICUNA_13B = "sampling:llava-1.6-vicuna-13b"


@pytest.fixture
def paper():
    return load_config(PAPER, ["output_dir=x"])


def test_public_figures_give_the_paper_weights(paper):
    """bf16 weights from the table's parameter counts; SD3-Medium in fp16 with or without T5 and offload."""
    needs = pool_needs(paper)
    assert needs["sampling:llava-1.6-mistral-7b"].weights == pytest.approx(7.57e9 * 2 / GiB)
    assert needs[VICUNA_13B].weights == pytest.approx(13.4e9 * 2 / GiB)
    assert needs["rewards"].weights == pytest.approx(7.51e9 * 2 / GiB)        # ArmoRM, text only
    assert needs["selection"].weights == pytest.approx(0.447e9 * 4 / GiB)     # ImageReward in float32
    # KV cache: Llama-2-13B, 40 layers x 40 KV heads x 128, K and V in bf16, 4,096 tokens x 8 sequences
    assert needs[VICUNA_13B].work == pytest.approx(2 * 40 * 40 * 128 * 2 * 4096 * 8 / GiB)
    im = paper.images
    im.cpu_offload, im.drop_t5 = False, False
    assert images_need(im).weights == pytest.approx((2.028 + 0.124 + 0.695 + 4.762 + 0.084) * 1e9 * 2 / GiB)
    im.drop_t5 = True
    assert images_need(im).weights == pytest.approx((2.028 + 0.124 + 0.695 + 0.084) * 1e9 * 2 / GiB)
    im.drop_t5, im.cpu_offload = False, True   # one model on the GPU at a time: T5-XXL is the largest
    assert images_need(im).weights == pytest.approx(4.762e9 * 2 / GiB)


def test_sd3_activations_grow_with_batch_and_pixels(paper):
    im = paper.images
    im.vae_slicing = False
    base = images_need(im).work
    im.batch_size = 8
    assert images_need(im).work == pytest.approx(2 * base)
    im.height = im.width = 512
    assert images_need(im).work == pytest.approx(base / 2, rel=0.1)
    im.vae_slicing = True   # the VAE decodes one image at a time: the MMDiT's activations are the peak
    assert images_need(im).work < base / 2


def test_tiny_model_numbers_are_exact(tiny_models):
    """Weights from the safetensors headers and KV from config.json, against the loaded models and dimensions
    read off the tiny LLaVA's config by hand (2 layers, 2 KV heads of 32)."""
    import json

    import torch
    from diffusers import DiffusionPipeline
    from transformers import LlavaForConditionalGeneration
    text = json.loads((tiny_models["llava"] / "config.json").read_text())["text_config"]
    assert (text["num_hidden_layers"], text["num_key_value_heads"], text["head_dim"]) == (2, 2, 32)
    s = SamplerConfig(model=str(tiny_models["llava"]), backend="vllm", dtype="bfloat16", max_model_len=512,
                      max_num_seqs=3)
    need = sampler_need(s)
    params = sum(p.numel() for p in LlavaForConditionalGeneration.from_pretrained(tiny_models["llava"]).parameters())
    assert need.weights * GiB == pytest.approx(params * 2, abs=0.5)
    assert need.work * GiB == 2 * 2 * 2 * 32 * 2 * 512 * 3       # K and V x layers x heads x dim x bf16 x tokens
    assert need.total == need.weights + need.work + RUNTIME_GIB and need.seqs == 3
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"], dtype=torch.float32)
    sd = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["output_dir=x", f"images.model={tiny_models['sd']}"])
    assert images_need(cfg.images).weights * GiB == pytest.approx(sd * 4, abs=0.5)   # tiny.yaml: float32


def test_a_pool_that_cannot_fit_is_refused(paper):
    paper.samplers[1].max_num_seqs = 256    # 13B: 25 GiB of weights + 256 x 3.125 GiB of KV cache: not even on 8
    with pytest.raises(InputError) as e:
        make_plan(paper, 8)
    msg = str(e.value)
    assert "\n" not in msg and f"pool {VICUNA_13B} needs 827.0 GiB" in msg and "KV cache (256 x 4096 tokens) 800.0" in msg
    assert "at most 1 x 80 GiB" in msg and "max_num_seqs" in msg
    with pytest.raises(InputError, match=r"pool images needs 12\.5 GiB .* at most 1 x 12 GiB"):
        make_plan(load_config(PAPER, ["output_dir=x"]), 8, gpu_gib=12)


def test_cli_refuses_in_one_line(tmp_path, capsys):
    from pipelines.cli import main
    assert main(["plan", str(PAPER), "--gpus", "8", "--gpu-memory", "12", "--out", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("synthalign: error:") and "\n" not in err
    assert "pool images needs 12.5 GiB" in err and "1 x 12 GiB" in err
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("gpus,gpu_gib", [(8, 80.0), (4, 80.0), (8, 48.0)])
def test_planned_shares_hold_their_models(paper, tmp_path, gpus, gpu_gib):
    if gpu_gib < 52:   # the 13B's 8 default sequences do not fit 48 GiB: plan it with fewer
        paper.samplers[1].max_num_seqs = 4
    plan = make_plan(paper, gpus, gpu_gib=gpu_gib)
    cfg = load_config(write_plan(plan, paper, PAPER, tmp_path / "p.yaml"))
    assert memory_problems(cfg, gpu_gib) == []
    for k, p in cfg.running_pools().items():
        assert plan.needs[k].total <= p.num_gpus * gpu_gib
    for s in cfg.samplers:   # each engine: the sequences the plan gave it fit what vLLM takes of its GPU
        assert sampler_need(s).total <= s.gpu_memory_utilization * gpu_gib and s.max_num_seqs >= 4


def test_paper_1node_fits_by_the_plans_arithmetic():
    cfg = load_config(ROOT / "configs" / "paper-1node.yaml")
    assert memory_problems(cfg, 80.0) == []
    cfg.samplers[1].gpu_memory_utilization = 0.5     # vLLM would take 40 GiB for the 13B's 52
    assert memory_problems(cfg, 80.0) == [
        f"pool {VICUNA_13B} needs {sampler_need(cfg.samplers[1]).describe()} but its share is "
        f"{cfg.pool('sampling', cfg.samplers[1]).num_gpus:g} x 80 GiB = 40.0 GiB"]


def test_a_judge_costs_time_and_memory_in_the_plan():
    """The VLM judge (selection.scorer judge, rewards.weights.judge) is planned like the models it is: a forward
    pass per object over the image's tokens, and its weights on the pool's GPU share."""
    from pipelines.config import load_config
    from pipelines.plan import default_costs
    from pipelines.plan_memory import rewards_need, selection_need
    base = load_config(ROOT / "configs" / "paper.yaml")
    judged = load_config(ROOT / "configs" / "paper.yaml", [
        "selection.scorer=judge", "selection.model=llava-hf/llava-v1.6-mistral-7b-hf",
        "rewards.judge_model=llava-hf/llava-v1.6-mistral-7b-hf", "rewards.weights.judge=1.0"])
    before, after = default_costs(base), default_costs(judged)
    assert after["selection"] > 10 * before["selection"] and after["rewards"] > before["rewards"]
    assert selection_need(judged.selection).weights > 13 > selection_need(base.selection).weights
    assert rewards_need(judged.rewards).weights - rewards_need(base.rewards).weights > 13


def test_an_engine_no_single_gpu_holds_is_sharded_over_the_fewest_gpus_of_a_node(tmp_path):
    """On 40 GB cards the 13B sampler (25 GiB of bf16 weights + 8 sequences of KV cache) fits no GPU: the plan gives
    its engine tensor_parallel_size 2 and its actors 2 whole GPUs; the written config loads with every share
    holding its model. The 7B samplers stay on one GPU each."""
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    plan = make_plan(cfg, 8, gpu_gib=40.0)
    key = "sampling:llava-1.6-vicuna-13b"
    assert plan.needs[key].tp == 2 and plan.pools[key].num_gpus == 2.0
    assert all(plan.needs[s.pool_key].tp == 1 for s in cfg.samplers if "13b" not in s.model)
    assert plan.needs[key].total <= 40.0 and sum(plan.gpus.values()) <= 8
    out = write_plan(plan, cfg, ROOT / "configs" / "paper.yaml", tmp_path / "plan40.yaml")
    planned = load_config(out)
    assert {s.label: s.tensor_parallel_size for s in planned.samplers} == {
        "llava-1.6-mistral-7b": 1, "llava-1.6-vicuna-13b": 2, "llava-1.6-vicuna-7b": 1}
    assert memory_problems(planned, 40.0) == []
    assert planned.pool("sampling", planned.samplers[1]).num_gpus == 2.0


def test_a_sharded_engine_takes_whole_gpus_of_one_node():
    from pipelines.plan import pack
    # two nodes of 2 GPUs each
    assert pack({"tp": (2, 2.0)}, 4, per_node=2) == [["tp"], ["tp"], ["tp"], ["tp"]]
    assert pack({"tp": (1, 2.0), "a": (2, 0.6)}, 4, per_node=2) == [["tp"], ["tp"], ["a"], ["a"]]
    assert pack({"tp": (1, 2.0), "a": (3, 0.6)}, 4, per_node=2) is None    # the engine's 2 GPUs are its alone
    assert pack({"tp": (1, 4.0)}, 4, per_node=2) is None      # 4 GPUs, but never 4 on one node
    assert pack({"tp": (1, 4.0)}, 4) == [["tp"]] * 4


def test_a_user_set_tensor_parallel_size_is_kept_and_a_model_too_big_for_a_node_is_refused():
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    cfg.samplers[0].tensor_parallel_size = 2      # the user's choice, though one 80 GB GPU would hold it
    plan = make_plan(cfg, 8)
    assert plan.needs["sampling:llava-1.6-mistral-7b"].tp == 2
    assert plan.pools["sampling:llava-1.6-mistral-7b"].num_gpus == 2.0
    big = load_config(ROOT / "configs" / "paper.yaml")
    big.samplers[1].max_num_seqs = 64     # 25 GiB of weights + 200 GiB of KV cache: 4 GPUs of 80 hold it
    assert make_plan(big, 4, nodes=2).needs[VICUNA_13B].tp == 4
    with pytest.raises(InputError, match=r"pool sampling:llava-1.6-vicuna-13b needs .* at most 1 x 80 GiB"):
        make_plan(big, 2, nodes=4)        # as many GPUs, but an engine shards over one node's only
