"""The run config: every shipped config loads; bad keys, types and values are named with their file."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from actors.common.errors import InputError
from pipelines.config import load_config

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_every_config_the_docs_name_is_shipped():
    import re
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {m for doc in docs for m in re.findall(r"configs/[\w.-]+\.yaml", doc.read_text())}
    assert named and named <= {f"configs/{p.name}" for p in SHIPPED}, named


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.samplers and cfg.images.guidance_scales


def test_paper_recipe():
    """Published facts only (PDS-DPO, arXiv 2412.17417): SD3-Medium at guidance 5/7/9/11 with 28 steps, LLaVA-1.6
    samplers, ArmoRM as the reward model, LoRA r=128 alpha=256 on LLaVA-1.5-7B, lr 1e-5, beta 0.1, 2 epochs,
    ZeRO-2. A change here changes what the config claims to reproduce; pools, dtypes and sampling settings are
    ours to tune and are not pinned here."""
    from pipelines.train.config import load_deepspeed_config
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    assert cfg.images.model == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert cfg.images.guidance_scales == [5.0, 7.0, 9.0, 11.0] and cfg.images.steps == 28
    assert [s.model for s in cfg.samplers] == ["llava-hf/llava-v1.6-mistral-7b-hf",
                                               "llava-hf/llava-v1.6-vicuna-13b-hf",
                                               "llava-hf/llava-v1.6-vicuna-7b-hf"]
    assert cfg.rewards.text_model == "RLHFlow/ArmoRM-Llama3-8B-v0.1"
    t = cfg.train
    assert (t.model, t.lora.r, t.lora.alpha, t.learning_rate, t.beta, t.num_train_epochs) == \
        ("llava-hf/llava-1.5-7b-hf", 128, 256, 1e-5, 0.1, 2.0)
    assert load_deepspeed_config(t.deepspeed)["zero_optimization"]["stage"] == 2   # the file, not its name


@pytest.mark.parametrize("name,pairs", [("pairs-2k", 2000), ("pairs-9k", 9000)])
def test_pair_configs_are_the_paper_recipe_at_another_size(name, pairs):
    """What their header says: paper.yaml with other counts, pools and output folder, nothing else; and enough
    image-questions for the pairs the name promises (a pair comes from one image-question at most)."""
    paper, cfg = load_config(ROOT / "configs" / "paper.yaml"), load_config(ROOT / "configs" / f"{name}.yaml")
    a, b = paper.to_dict(), cfg.to_dict()
    assert {k for k in a if a[k] != b[k]} <= {"prompts", "pools", "output_dir"}
    a["prompts"].pop("num_prompts"), b["prompts"].pop("num_prompts")
    assert a["prompts"] == b["prompts"]
    assert cfg.prompts.num_prompts * cfg.prompts.instructions_per_prompt >= pairs


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "output_dir: out\nimages: {model: m}\nselection: {model: c}\nsamplers: [{model: v}]\n" \
       "rewards: {text_model: r}\ntrain: {model: t}\n"


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["prompts.num_prompts=7", "images.guidance_scales=[3, 4.5]",
                                              "pools.images.num_gpus=0.5", "rewards.weights.clip=0"])
    assert cfg.prompts.num_prompts == 7 and cfg.images.guidance_scales == [3.0, 4.5]
    assert cfg.pool("images").num_gpus == 0.5 and cfg.rewards.weights == {"clip": 0.0}


@pytest.mark.parametrize("text,overrides,field,words", [
    (BASE + "promts: {num_prompts: 3}\n", [], "promts", "unknown key"),
    (BASE, ["images.stepz=3"], "images.stepz", "unknown key"),
    (BASE, ["images.steps=abc"], "images.steps", "expected int"),
    (BASE, ["images.steps=true"], "images.steps", "expected int"),
    (BASE, ["prompts.num_prompts=0"], "prompts.num_prompts", "must be > 0"),
    (BASE, ["prompts.num_prompts=-3"], "prompts.num_prompts", "must be > 0"),
    (BASE, ["images.guidance_scales=[]"], "images.guidance_scales", "at least one"),
    (BASE, ["samplers=[]"], "samplers", "at least one"),
    (BASE, ["pools.imagez.size=1"], "pools.imagez", "unknown stage"),
    (BASE, ["pools.images.size=0"], "pools.images.size", ">= 1"),
    (BASE, ["pairs.min_margin=-1"], "pairs.min_margin", ">= 0"),
    ("images: {model: m}\n", [], "output_dir", "required"),
])
def test_bad_config_names_file_and_key(tmp_path, text, overrides, field, words):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert str(path) in msg and f"field '{field}'" in msg and words in msg
    assert "\n" not in msg


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = write(tmp_path, "output_dir: x\nimages: {model: [unclosed\n")
    with pytest.raises(InputError, match=r"c.yaml, row \d+: YAML syntax error"):
        load_config(path)


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"output_dir: \xff\xfe\n")
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_config(p)


def test_extends_merges_and_detects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE + "prompts: {num_prompts: 5, seed: 3}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nprompts: {num_prompts: 9}\n")
    cfg = load_config(child)
    assert (cfg.prompts.num_prompts, cfg.prompts.seed) == (9, 3)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(InputError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_hash_ignores_scheduling_but_not_data():
    a = load_config(ROOT / "configs" / "tiny.yaml")
    b = load_config(ROOT / "configs" / "tiny.yaml", ["pools.images.size=3", "output_dir=elsewhere"])
    c = load_config(ROOT / "configs" / "tiny.yaml", ["images.steps=3"])
    assert a.hash() == b.hash() != c.hash()


def test_problems_are_located_by_key_as_data():
    from actors.common.errors import Problem
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cfg.pools["images"].size = 0
    cfg.samplers[1].n = 0
    problems = cfg.validate()
    assert Problem("pools.images.size", "must be >= 1") in problems
    assert any(p.key == "samplers[1].n" for p in problems)
    assert all(isinstance(p, Problem) for p in problems)


def test_fault_stage_must_name_a_pool_of_the_stage_list():
    with pytest.raises(InputError, match="faults.stage.*images, selection, sampling, rewards"):
        load_config(ROOT / "configs" / "tiny.yaml", ["faults.stage=imagez"])


def test_train_hash_follows_the_recipe_not_how_it_is_watched():
    base = load_config(ROOT / "configs" / "tiny.yaml")
    same = load_config(ROOT / "configs" / "tiny.yaml", ["train.save_steps=3", "train.workers.threads=2",
                                                       "train.report_to=[none]", "pools.images.size=1"])
    assert base.train_hash() == same.train_hash()
    for change in ("train.beta=0.2", "train.lora.r=4", "train.workers.num_workers=1", "images.steps=3"):
        assert load_config(ROOT / "configs" / "tiny.yaml", [change]).train_hash() != base.train_hash(), change
    assert load_config(ROOT / "configs" / "tiny.yaml", ["train.beta=0.2"]).hash() == base.hash()


# What paper-twin.yaml may change: model paths, sizes, pools, and the named CPU stand-ins (see its header).
TWIN_MAY_CHANGE = (r"output_dir|tiny_models|tiny_recipe|rows_per_shard|eval\..*|prompts\.num_prompts"
                   r"|images\.(model|steps|height|width|dtype|cpu_offload)|selection\.model"
                   r"|samplers\[\d\]\.(model|backend|max_new_tokens|dtype)|rewards\.(text_model|dtype)|pools\..*"
                   r"|train\.(model|lora\.r|lora\.alpha|num_train_epochs|bf16|save_steps|workers\..*)")


def test_paper_twin_differs_from_paper_only_in_paths_sizes_pools_and_cpu_stand_ins():
    import re

    from pipelines.folder import changed_keys
    twin_cfg = load_config(ROOT / "configs" / "paper-twin.yaml")
    differing = changed_keys(load_config(ROOT / "configs" / "paper.yaml").to_dict(), twin_cfg.to_dict())
    assert differing and all(re.fullmatch(TWIN_MAY_CHANGE, k) for k in differing), \
        sorted(k for k in differing if not re.fullmatch(TWIN_MAY_CHANGE, k))
    # The recipe itself is the paper's (published in the paper and the authors' run_dpo.sh).
    t = twin_cfg.train
    assert (t.beta, t.learning_rate, t.projector_lr, t.global_batch_size, t.deepspeed, t.loss_type) == \
        (0.1, 1e-5, 2e-5, 2, "configs/deepspeed/zero2.json", "sigmoid")
