"""The run folder's one owner: stale parts are named, cleared only with --overwrite, unchanged parts resume."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from actors.common.errors import InputError
from pipelines.config import load_config
from pipelines.folder import RunFolder


def cfg(tmp_path, *sets):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path / 'run'}", *sets])


def fake_run(c):
    """A folder as a finished run of config `c` leaves it: data, a training run with its recipe, an evaluation."""
    folder = RunFolder(c)
    folder.prepare(train=True)
    folder.write_manifest({"status": "complete"})
    for part in ("scored", "pairs", "train/ray/dpo", "eval"):
        (Path(folder.root) / part).mkdir(parents=True, exist_ok=True)
        (Path(folder.root) / part / "x").write_text("old")
    folder.claim_train()
    return Path(folder.root)


def test_unchanged_config_resumes_everything(tmp_path):
    run = fake_run(cfg(tmp_path))
    RunFolder(cfg(tmp_path, "pools.images.size=1", "train.save_steps=2")).prepare(train=True)
    assert all((run / p / "x").exists() for p in ("scored", "pairs", "train/ray/dpo", "eval"))


def test_changed_recipe_is_an_error_naming_the_keys(tmp_path):
    run = fake_run(cfg(tmp_path))
    new = cfg(tmp_path, "train.beta=0.3", "train.lora.r=4")
    with pytest.raises(InputError, match=r"training run of another recipe \(changed: train.beta, train.lora.r\)"):
        RunFolder(new).prepare(train=True)
    RunFolder(new).prepare()                    # generate alone does not care about the recipe
    assert (run / "train/ray/dpo/x").exists()
    RunFolder(new).prepare(overwrite=True, train=True)
    assert not (run / "train").exists() and not (run / "eval").exists()   # stale: the old checkpoints too
    assert (run / "scored/x").exists() and (run / "pairs/x").exists()    # the data still belongs to it


def test_changed_data_config_clears_data_and_training_with_overwrite_only(tmp_path):
    run = fake_run(cfg(tmp_path))
    new = cfg(tmp_path, "images.steps=3")
    with pytest.raises(InputError, match=r"generated data of another config \(changed: images.steps\)"):
        RunFolder(new).prepare()
    assert (run / "scored/x").exists()
    RunFolder(new).prepare(overwrite=True)
    assert not any((run / p).exists() for p in ("scored", "pairs", "train", "eval", "manifest.json"))


def test_training_without_a_recorded_recipe_is_not_resumed_blindly(tmp_path):
    c = cfg(tmp_path)
    run = fake_run(c)
    (run / "train" / "recipe.json").unlink()
    with pytest.raises(InputError, match="unrecorded training recipe"):
        RunFolder(c).prepare(train=True)


def test_a_changed_sampler_is_named_by_index(tmp_path):
    fake_run(cfg(tmp_path))
    with pytest.raises(InputError, match=r"changed: samplers\[1\]\.n\)"):
        RunFolder(cfg(tmp_path, "samplers=[{model: .synthalign/tiny/llava, name: tiny-llava-a, n: 2, "
                                "temperature: 1.0, max_new_tokens: 16}, {model: .synthalign/tiny/llava-b, "
                                "name: tiny-llava-b, n: 3, temperature: 1.0, max_new_tokens: 16}]")).prepare()


def test_a_folder_from_before_an_option_existed_resumes_while_the_option_is_off(tmp_path):
    """A manifest written before images.store_size / images.keep_render existed: off (null, false) they change
    no data, so the folder resumes; set, they are named."""
    import json
    run = fake_run(cfg(tmp_path))
    manifest = json.loads((run / "manifest.json").read_text())
    for key in ("store_size", "keep_render"):
        del manifest["data_config"]["images"][key]
    manifest["data_hash"] = "from-an-older-version"
    (run / "manifest.json").write_text(json.dumps(manifest))
    RunFolder(cfg(tmp_path)).prepare()
    assert (run / "scored" / "x").exists()
    with pytest.raises(InputError, match=r"changed: images.keep_render, images.stages_see, images.store_size\)"):
        RunFolder(cfg(tmp_path, "images.store_size=32", "images.keep_render=true")).prepare()


# Data hashes computed by the code in which images.store_size also shrank what selection, samplers and rewards saw
BEFORE = {("tiny.yaml",): "eeb248d6c0d4799e", ("tiny.yaml", "images.keep_render=true"): "e8008c24ea2e5d40",
          ("shapes.yaml",): "854ae7f53fe9148a", ("tiny.yaml", "images.store_size=32"): "6fd6a29d70bfd6ac"}


def test_store_size_null_hashes_as_before_and_set_it_makes_other_data(tmp_path):
    """Every stage now sees the full render: with store_size null nothing changed, so the hash is the old one and
    an old folder resumes; with store_size set the answers differ, so the hash differs and an old folder (its
    manifest without the hash-only marker) is named stale instead of resumed with mixed answers."""
    import json
    for (name, *sets), old in BEFORE.items():
        new = load_config(ROOT / "configs" / name, ["output_dir=x", *sets]).hash()
        assert (new == old) == ("images.store_size=32" not in sets), (name, sets)
    sized = cfg(tmp_path, "images.store_size=32")
    assert sized.data_dict()["images"]["stages_see"] == "full render"
    assert "stages_see" not in cfg(tmp_path).data_dict()["images"]
    run = fake_run(sized)
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["data_config"]["images"]["stages_see"]      # as the older code wrote it
    manifest["data_hash"] = BEFORE[("tiny.yaml", "images.store_size=32")]
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"another config \(changed: images.stages_see\)"):
        RunFolder(sized).prepare()
    assert (run / "scored" / "x").exists()
    RunFolder(sized).prepare(overwrite=True)
    assert not (run / "scored").exists()
