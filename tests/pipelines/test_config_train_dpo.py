"""`train.dpo`: TRL DPOConfig options beyond the recipe's, checked against DPOConfig's fields on load, settable with
`--set`, and out of the train hash while empty (run folders made before it still match their configs)."""
from __future__ import annotations

import pytest
from conftest import ROOT

from actors.common.errors import InputError
from pipelines.config import _digest, load_config
from pipelines.folder import changed_keys

TINY = ROOT / "configs" / "tiny.yaml"
BASE = "output_dir: out\nimages: {model: m}\nselection: {model: c}\nsamplers: [{model: v}]\n" \
       "rewards: {text_model: r}\n"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_train_dpo_loads_from_yaml_and_from_set(tmp_path):
    path = write(tmp_path, BASE + "train: {model: t, dpo: {ld_alpha: 0.5, loss_type: [sigmoid, bco_pair]}}\n")
    assert load_config(path).train.dpo == {"ld_alpha": 0.5, "loss_type": ["sigmoid", "bco_pair"]}
    # --set adds a key beside the file's, replaces one, and makes the mapping when the file has none
    cfg = load_config(path, ["train.dpo.loss_weights=[1.0, 0.5]", "train.dpo.ld_alpha=0.25"])
    assert cfg.train.dpo == {"ld_alpha": 0.25, "loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1.0, 0.5]}
    assert load_config(TINY, ["train.dpo.ld_alpha=0.5"]).train.dpo == {"ld_alpha": 0.5}


@pytest.mark.parametrize("override,words", [
    ("train.dpo.rpo_alpha=0.5", "not a field of TRL's DPOConfig (did you mean ld_alpha?)"),
    ("train.dpo.ld_alpha=abc", "expected float | None, got str 'abc'"),
    ("train.dpo.ref_model_sync_steps=true", "expected int, got bool True"),
    ("train.dpo.beta=0.2", "use train.beta"),
    ("train.dpo.per_device_train_batch_size=4", "use train.per_device_batch_size"),
    ("train.dpo.warmup_ratio=0.1", "use train.warmup_ratio"),
    ("train.dpo.output_dir=/tmp/x", "set by the run"),
    ("train.dpo.report_to=[wandb]", "use train.report_to"),
    ("train.dpo.max_length=64", "use train.max_length"),
    ("train.dpo.loss_type=[sigmoid, nope]", "unknown ['nope'] (TRL knows sigmoid"),
    ("train.dpo.loss_weights=[1.0, 2.0]", "2 weights for 1 loss type(s)"),
])
def test_train_dpo_refusals_are_one_line_naming_the_key(override, words):
    key = override.split("=")[0]
    with pytest.raises(InputError) as e:
        load_config(TINY, [override])
    msg = str(e.value)
    assert str(TINY) in msg and f"field '{key}'" in msg and words in msg, msg
    assert "\n" not in msg


def test_a_train_dpo_loss_list_does_not_mix_with_the_recipes_loss():
    with pytest.raises(InputError, match=r"field 'train.dpo.loss_type': replaces train.loss_type and train.sft_w"):
        load_config(TINY, ["train.sft_weight=1.0", "train.dpo.loss_type=[ipo]"])


def test_the_train_hash_of_existing_configs_is_unchanged():
    cfg = load_config(TINY)
    # configs/tiny.yaml's train section, hashed by the code before `train.dpo` existed
    assert "dpo" not in cfg.train_dict() and _digest(cfg.train_dict()) == "185e638d6c9b7df1"
    assert load_config(TINY, ["train.dpo={}"]).train_hash() == cfg.train_hash()
    changed = load_config(TINY, ["train.dpo.ld_alpha=0.5"])
    assert changed.hash() == cfg.hash() and changed.train_hash() != cfg.train_hash()
    assert changed_keys(cfg.train_dict(), changed.train_dict(), "train") == ["train.dpo.ld_alpha"]
