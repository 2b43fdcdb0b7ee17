"""`export --format hf`: a real tiny run's pairs as a dataset folder that `datasets.load_dataset` reads with an
Image feature, split by prompt, with a card the Hub parses, that TRL's DPOTrainer trains on as it is."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import ROOT, tiny_config
from PIL import Image

from actors.common.errors import InputError
from pipelines.report.hf import check_repo, export_hf, push_to_hub, split_prompts

N_PROMPTS, N_INSTR, TEST_FRACTION = 6, 2, 0.3


@pytest.fixture(scope="module")
def run(tiny_models, ray_local, tmp_path_factory):
    from cluster.connect import connect
    from pipelines.generate.job import run_generate
    out = tmp_path_factory.mktemp("hfrun") / "run"
    cfg = tiny_config(tiny_models, out, **{"prompts.num_prompts": N_PROMPTS,
                                            "prompts.instructions_per_prompt": N_INSTR})
    connect()
    run_generate(cfg)
    return out


@pytest.fixture(scope="module")
def exported(run):
    return export_hf(run, test_fraction=TEST_FRACTION, seed=0)


@pytest.fixture(scope="module")
def loaded(exported, tmp_path_factory):
    import datasets
    return datasets.load_dataset(str(exported), cache_dir=str(tmp_path_factory.mktemp("hfcache")))


def pairs_rows(run) -> dict[str, dict]:
    return {r["pair_id"]: r for r in pads.dataset(str(run / "pairs"), format="parquet").to_table().to_pylist()}


def test_default_folder_and_hub_file_names(run, exported):
    assert exported == run / "export" / "hf"
    assert sorted(p.name for p in (exported / "data").iterdir()) == ["test-00000-of-00001.parquet",
                                                                      "train-00000-of-00001.parquet"]
    assert sorted(p.name for p in exported.parent.iterdir()) == ["hf"]   # no temporary folder left beside


def test_loads_with_image_feature_split_by_prompt(run, loaded):
    import datasets
    pairs = pairs_rows(run)
    assert set(loaded) == {"train", "test"}
    for split in loaded.values():
        assert split.features["images"] == datasets.List(datasets.Image())
        assert split.features["margin"] == datasets.Value("float64")
    train, test = ({r["pair_id"]: r for r in loaded[s]} for s in ("train", "test"))
    assert len(train) + len(test) == len(pairs) == loaded["train"].num_rows + loaded["test"].num_rows
    assert set(train) | set(test) == set(pairs)
    train_prompts, test_prompts = {r["prompt_id"] for r in train.values()}, {r["prompt_id"] for r in test.values()}
    assert not train_prompts & test_prompts
    assert len(test_prompts) == round(TEST_FRACTION * N_PROMPTS) == 2
    assert len(train_prompts) == N_PROMPTS - 2
    for pid, row in {**train, **test}.items():
        src = pairs[pid]
        (img,) = row["images"]
        assert isinstance(img, Image.Image) and img.size == Image.open(io.BytesIO(src["image"])).size == (64, 64)
        assert row["prompt"] == [{"role": "user", "content": [{"type": "image", "text": None},
                                                              {"type": "text", "text": src["question"]}]}]
        assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": src["chosen"]}]}]
        assert row["rejected"][0]["content"][0]["text"] == src["rejected"]
        for col in ("prompt_id", "chosen_model", "rejected_model", "chosen_reward", "rejected_reward", "margin",
                    "seed", "guidance_scale", "image_score", "gt_objects", "candidate_seeds"):
            assert row[col] == src[col], col


def test_split_is_seeded_deterministic_and_never_empty():
    ids = [f"p{i}" for i in range(40)]
    a = split_prompts(ids, 0.05, seed=0)
    assert len(a) == 2 and a <= set(ids)
    assert split_prompts(list(reversed(ids)) + ids, 0.05, seed=0) == a   # order and repeats do not matter
    assert any(split_prompts(ids, 0.05, seed=s) != a for s in range(1, 5))
    assert len(split_prompts(["x", "y"], 0.01, 0)) == 1                  # at least one prompt in test
    assert len(split_prompts(["x", "y"], 0.9, 0)) == 1                   # and never all of them
    assert split_prompts(["x"], 0.5, 0) == set() and split_prompts(ids, 0.0, 0) == set()


def test_same_seed_same_split(run, exported, tmp_path):
    again = export_hf(run, tmp_path / "again", test_fraction=TEST_FRACTION, seed=0)
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
        ids = [pads.dataset(str(f / "data" / name)).to_table(columns=["pair_id"]).column(0).to_pylist()
               for f in (exported, again)]
        assert ids[0] == ids[1] and ids[0]


def test_card_parses_with_licence_task_and_counts(run, exported):
    from huggingface_hub import DatasetCard
    card = DatasetCard.load(exported / "README.md")
    manifest = json.loads((run / "manifest.json").read_text())
    n = manifest["counts"]["pairs"]
    assert card.data.license == "other" and card.data.license_name == "model-output-licences"
    assert card.data.task_categories == ["image-text-to-text", "visual-question-answering"]
    assert card.data.size_categories == ["n<1K"] and "dpo" in card.data.tags
    splits = {s["name"]: s["num_examples"] for s in card.data.dataset_info["splits"]}
    assert sum(splits.values()) == n and set(splits) == {"train", "test"}
    assert card.data.configs[0]["data_files"] == [{"split": "train", "path": "data/train-*"},
                                                   {"split": "test", "path": "data/test-*"}]
    text = card.text
    assert f"Config hash `{manifest['data_hash']}`" in text
    assert f"{N_PROMPTS} prompts, {N_PROMPTS * N_INSTR} image-questions" in text and f"{n} pairs" in text
    assert text.count("unknown, check the model card") == 5   # sd, clip, two LLaVAs, reward: local tiny models
    rows = [line for line in text.splitlines() if line.startswith("| ") and " .. " in line]
    chosen_rejected, margins = rows[:10], rows[10:]
    assert sum(int(r.split("|")[2]) for r in chosen_rejected) == n
    assert sum(int(r.split("|")[3]) for r in chosen_rejected) == n
    assert sum(int(r.split("|")[2]) for r in margins) == n


def test_paper_models_licences():
    from pipelines.config import load_config
    from pipelines.report.card import _licence_cell, dataset_licence, stage_models
    stages = stage_models(load_config(ROOT / "configs" / "paper.yaml").to_dict())
    cells = {m: _licence_cell(m) for _, m, _ in stages}
    assert "Stability AI Community License" in cells["stabilityai/stable-diffusion-3-medium-diffusers"]
    assert "Apache 2.0" in cells["llava-hf/llava-v1.6-mistral-7b-hf"]
    assert "Llama 2" in cells["llava-hf/llava-v1.6-vicuna-13b-hf"]
    assert "Llama 3" in cells["RLHFlow/ArmoRM-Llama3-8B-v0.1"] and "ImageReward" in cells["ImageReward-v1.0"]
    assert len(stages) == 6   # images, selection, three samplers, text reward (CLIP weight 0)
    assert dataset_licence([m for _, m, _ in stages]) == ("other", "model-output-licences")
    assert dataset_licence(["llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-1.5-7b-hf"]) == ("llama2", None)
    assert dataset_licence(["llava-hf/llava-v1.6-vicuna-7b-hf", "my/model"])[0] == "other"


def test_dpo_trainer_trains_on_the_train_split_as_is(loaded, tiny_models, tmp_path):
    """Our recipe's DPOTrainer (projector group, LoRA, remove_unused_columns=False: the lineage columns reach the
    collator) takes the loaded split unchanged and runs 2 steps."""
    import math

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipelines.train.config import LoraConfig, TrainConfig
    from pipelines.train.dpo import dpo_args, lora_config, trainer_class
    torch.manual_seed(0)
    llava = str(tiny_models["llava"])
    cfg = TrainConfig(model=llava, max_steps=2, per_device_batch_size=2, learning_rate=1e-3, projector_lr=1e-3,
                      lr_scheduler_type="constant", warmup_ratio=0.0, report_to=["none"], save_steps=100,
                      gradient_checkpointing=False, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    trainer = trainer_class(cfg)(model=AutoModelForImageTextToText.from_pretrained(llava),
                                 args=dpo_args(cfg, str(tmp_path / "hf"), use_cpu=True),
                                 train_dataset=loaded["train"], peft_config=lora_config(cfg),
                                 processing_class=AutoProcessor.from_pretrained(llava))
    trainer.train()
    logged = [m for m in trainer.state.log_history if "loss" in m]
    assert trainer.state.global_step == 2 and logged
    assert all(math.isfinite(m["loss"]) and "rewards/margins" in m for m in logged)


# ---------------------------------------------------------------- bad input, without a Ray run

def fake_run(root: Path, n: int = 8, **counts) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "pipelines" / "train"))
    from train_fixtures import make_pairs_parquet
    make_pairs_parquet(root / "pairs", n=n, files=2)
    (root / "manifest.json").write_text(json.dumps({"data_hash": "abc", "counts": {"pairs": n, **counts},
                                                    "config": {}}))
    return root


def test_card_counts_drops_by_reason(tmp_path):
    run = fake_run(tmp_path / "run", n=8, prompts=4, questions=12, dropped={"tie": 1, "below min_margin": 3})
    text = (export_hf(run, tmp_path / "out") / "README.md").read_text()
    assert "4 prompts, 12 image-questions" in text and "8 pairs" in text
    assert "Dropped image-questions by reason: below min_margin 3, tie 1." in text
    assert "| train | 6 | 3 |" in text and "| test | 2 | 1 |" in text   # 4 prompts of 2 pairs: one held out


def test_not_a_run_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no pairs/.*parquet here: not a run folder"):
        export_hf(tmp_path / "empty", tmp_path / "out")
    run = fake_run(tmp_path / "run")
    (run / "manifest.json").unlink()
    with pytest.raises(InputError, match="no manifest.json"):
        export_hf(run, tmp_path / "out")
    with pytest.raises(InputError, match="--test-fraction"):
        export_hf(fake_run(tmp_path / "run2"), tmp_path / "out", test_fraction=1.0)
    import pyarrow.parquet as pq
    run3 = fake_run(tmp_path / "run3")
    for f in (run3 / "pairs").iterdir():
        pq.write_table(pq.read_table(f).slice(0, 0), f)
    with pytest.raises(InputError, match="hold no rows"):
        export_hf(run3)
    assert not (tmp_path / "out").exists() and not (tmp_path / "empty" / "export").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run", "run2", "run3"]
    assert sorted(p.name for p in run3.iterdir()) == ["manifest.json", "pairs"]


def test_out_not_empty_needs_overwrite_and_then_only_an_export(tmp_path):
    run = fake_run(tmp_path / "run")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty; pass --overwrite"):
        export_hf(run, tmp_path / "busy")
    with pytest.raises(InputError, match="not an earlier export"):
        export_hf(run, tmp_path / "busy", overwrite=True)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    out = export_hf(run, tmp_path / "out", test_fraction=0.0)
    assert [p.name for p in (out / "data").iterdir()] == ["train-00000-of-00001.parquet"]   # no test split
    with pytest.raises(InputError, match="not empty"):
        export_hf(run, out)
    export_hf(run, out, overwrite=True, test_fraction=0.5)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["test-00000-of-00001.parquet",
                                                                 "train-00000-of-00001.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "out", "run"]


def test_push_checks_repo_and_token_then_creates_and_uploads(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))   # no stored login either
    with pytest.raises(InputError, match="field '--push-to-hub'"):
        check_repo("not a/valid/repo id")
    with pytest.raises(InputError, match="no Hugging Face token: set HF_TOKEN"):
        check_repo("me/pairs")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    check_repo("me/pairs")
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/datasets/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert push_to_hub(tmp_path, "me/pairs", private=True) == "https://huggingface.co/datasets/me/pairs"
    assert calls[0] == ("create_repo", "me/pairs", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert calls[1][2]["folder_path"] == str(tmp_path) and calls[1][2]["repo_type"] == "dataset"


def test_a_run_on_object_storage_exports_to_a_local_folder(s3_server, bucket, tmp_path, monkeypatch):
    from cluster.storage import Location
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    local = fake_run(tmp_path / "run")
    uri = f"{bucket}/runs/one"
    for f in sorted(local.rglob("*")):
        if f.is_file():
            (Location(uri) / str(f.relative_to(local))).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="needs --out"):
        export_hf(uri)
    with pytest.raises(InputError, match="must be a local folder"):
        export_hf(uri, f"{bucket}/out")
    out = export_hf(uri, tmp_path / "out", test_fraction=0.25)
    assert pads.dataset(str(out / "data"), format="parquet").count_rows() == 8
    assert "Config hash `abc`" in (out / "README.md").read_text()


def test_shards_roll_over_and_load_without_the_card(tmp_path, monkeypatch):
    import datasets

    import pipelines.report.hf as hf
    monkeypatch.setattr(hf, "SHARD_BYTES", 1)   # a new shard after every batch
    monkeypatch.setattr(hf, "BATCH_ROWS", 3)
    out = export_hf(fake_run(tmp_path / "run", n=12), tmp_path / "out", test_fraction=0.0)
    names = sorted(p.name for p in (out / "data").iterdir())
    assert names == [f"train-0000{i}-of-00004.parquet" for i in range(4)]
    (out / "README.md").unlink()   # the features ride in every shard's schema
    train = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert train.num_rows == 12 and train.features["images"] == datasets.List(datasets.Image())
    assert sorted(train["pair_id"]) == [f"p{i:04d}" for i in range(12)]
    assert train[0]["images"][0].size == (32, 32)
