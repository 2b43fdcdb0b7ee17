"""`prompts.source: llm` end to end on the tiny twins: the tiny prompt writer (a small Llama trained here for about a
minute to answer in the writer's three lines) writes prompts/ once; the run makes pairs from them; a resume reads
them without the writer; a random-weight writer fails in one line with nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import ROOT, tiny_config, tiny_yaml

from actors.common.errors import InputError


@pytest.fixture(scope="session")
def writer_models(tmp_path_factory) -> dict[str, Path]:
    from pipelines.models.writer import make_prompt_writer
    out = tmp_path_factory.mktemp("writer")
    return {"trained": make_prompt_writer(out, 0), "random": make_prompt_writer(out, 0, steps=0)}


def llm_config(tiny_models, writer: Path, output_dir: Path, **more):
    return tiny_config(tiny_models, output_dir, **{
        "prompts.source": "llm", "prompts.writer.model": writer, "prompts.num_prompts": 8,
        "prompts.instructions_per_prompt": 2, "rows_per_shard": 4, "pools.prompts.batch_size": 4, **more})


def read_rows(folder: Path, columns: list[str]) -> list[dict]:
    files = sorted(folder.glob("*.parquet"))
    return [r for f in files for r in pads.dataset(str(f)).to_table(columns=columns).to_pylist()]


def test_llm_without_writer_model_is_one_problem(tmp_path):
    from pipelines.config import load_config
    cfg_path = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(InputError) as e:
        load_config(cfg_path, [f"output_dir={tmp_path}", "prompts.source=llm"])
    assert str(e.value) == f"{cfg_path}, field 'prompts.writer.model': required when prompts.source is 'llm'"
    cfg = load_config(cfg_path, [f"output_dir={tmp_path}", "prompts.source=llm", "prompts.writer.model=m"])
    cfg.prompts.writer.model = None
    assert [p.key for p in cfg.validate()] == ["prompts.writer.model"]


def test_data_hash_covers_the_writer_only_for_llm(tmp_path):
    from pipelines.config import load_config
    base = [f"output_dir={tmp_path}"]
    plain = load_config(ROOT / "configs" / "tiny.yaml", base)
    assert "writer" not in plain.data_dict()["prompts"]   # folders made before the writer key keep their hash
    assert plain.hash() == load_config(ROOT / "configs" / "tiny.yaml", base + ["prompts.writer.temperature=0.5"]).hash()
    llm = base + ["prompts.source=llm", "prompts.writer.model=m"]
    a = load_config(ROOT / "configs" / "tiny.yaml", llm)
    b = load_config(ROOT / "configs" / "tiny.yaml", llm + ["prompts.writer.temperature=0.5"])
    c = load_config(ROOT / "configs" / "tiny.yaml", llm + ["pools.prompts.size=2"])
    assert a.data_dict()["prompts"]["writer"]["model"] == "m"
    assert a.hash() != b.hash() and a.hash() == c.hash()   # scheduling is not data


def test_answers_become_rows_with_counts_by_reason(coco_vocab, tmp_path):
    from pipelines.config import load_config
    from pipelines.generate.prompt_writing import prompt_rows
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={tmp_path}", "prompts.source=llm",
                                                        "prompts.writer.model=m", "prompts.instructions_per_prompt=3"])
    good = "Description: {}\nObjects: {}\nQuestion: Is it big?"
    texts = [{"prompt_id": "l0-3", "text": good.format("two cats on a red sofa", "cats")},
             {"prompt_id": "l0-1", "text": good.format("two cats on a red sofa", "cat")},   # same words: l0-3 goes
             {"prompt_id": "l0-2", "text": good.format("a dog near a bus", "dog, bus")},
             {"prompt_id": "l0-4", "text": good.format("a griffin", "griffin")},
             {"prompt_id": "l0-5", "text": "Description: a dog\nQuestion: What?"}]
    rows, counts = prompt_rows(texts, cfg.prompts, coco_vocab)
    assert [r["prompt_id"] for r in rows] == ["l0-1", "l0-2"]
    assert [r["gt_objects"] for r in rows] == [["cat"], ["bus", "dog"]]
    assert all(len(r["instructions"]) == 3 and r["instructions"][0] == "Is it big?" for r in rows)
    assert counts == {"asked": 5, "written": 2,
                      "dropped": {"unknown_object": 1, "missing_objects": 1, "near_duplicate": 1}}


def test_writer_input_fails_before_ray(tmp_path):
    from actors.prompt_writer import WriterConfig
    from actors.prompts import PromptsConfig
    from pipelines.generate.prompt_writing import check_writer
    cfg = PromptsConfig(source="llm", writer=WriterConfig(model=str(tmp_path), topics_file=str(tmp_path / "t.txt")))
    with pytest.raises(InputError, match="file not found"):
        check_writer(cfg, tmp_path / "run")
    (tmp_path / "t.txt").write_text("cats\n\nboats on a lake\n")
    assert check_writer(cfg, tmp_path / "run") == ["cats", "boats on a lake"]
    with pytest.raises(InputError, match="local or shared output_dir"):
        check_writer(cfg, "s3://bucket/run")


def test_llm_prompts_written_once_then_resumed(tiny_models, writer_models, ray_local, coco_vocab, tmp_path):
    from pipelines.generate.job import run_generate
    cfg = llm_config(tiny_models, writer_models["trained"], tmp_path / "run")
    first = run_generate(cfg)
    prompts_dir = tmp_path / "run" / "prompts"
    written = [json.loads(line) for line in (prompts_dir / "prompts.jsonl").read_text().splitlines()]
    w = first["counts"]["prompt_writer"]
    assert w["writer_ran"] is True and w["asked"] == 8
    assert w["written"] == len(written) >= 4
    assert w["written"] + sum(w["dropped"].values()) == 8
    ids = [r["prompt_id"] for r in written]
    assert ids == sorted(ids) and all(i.startswith("l0-") for i in ids)
    for r in written:   # the writer's objects, as vocabulary classes; its question first, then a template one
        assert r["gt_objects"] and all(coco_vocab.canonical(o) == o for o in r["gt_objects"])
        assert len(r["instructions"]) == 2 and r["instructions"][0] != r["instructions"][1]
    assert first["counts"]["prompts"] == len(written)
    scored = read_rows(tmp_path / "run" / "scored", ["prompt_id", "gt_objects", "image_prompt"])
    assert {r["prompt_id"] for r in scored} == set(ids)
    by_id = {r["prompt_id"]: r for r in written}
    assert all(r["gt_objects"] == by_id[r["prompt_id"]]["gt_objects"] and
               r["image_prompt"] == by_id[r["prompt_id"]]["image_prompt"] for r in scored)
    pairs = read_rows(tmp_path / "run" / "pairs", ["pair_id"])
    assert first["counts"]["pairs"] == len(pairs) > 0

    mtime = (prompts_dir / "prompts.jsonl").stat().st_mtime_ns
    again = run_generate(cfg)   # a resume: nothing left to do, and the writer is not asked again
    assert again["counts"]["prompt_writer"]["writer_ran"] is False
    assert (prompts_dir / "prompts.jsonl").stat().st_mtime_ns == mtime
    assert again["counts"]["prompts_resumed"] == len(written)
    assert sorted(read_rows(tmp_path / "run" / "pairs", ["pair_id"]), key=str) == sorted(pairs, key=str)


def test_tiny_writer_text_is_a_function_of_config_and_row(writer_models, coco_vocab):
    import pyarrow as pa

    from actors.prompt_writer import PromptWriter, WriterConfig, parse_written
    from actors.prompts import topic_of
    writer = PromptWriter(WriterConfig(model=str(writer_models["trained"]), temperature=0.8, max_new_tokens=48))
    ids, topics = [f"l0-{i:07d}" for i in range(6)], [topic_of(0, "", i, 3, None) for i in range(6)]
    together = writer(pa.table({"prompt_id": ids, "topic": topics})).column("text").to_pylist()
    alone = [writer(pa.table({"prompt_id": [i], "topic": [t]})).column("text").to_pylist()[0]
             for i, t in zip(reversed(ids), reversed(topics))]
    assert together == list(reversed(alone))          # the same text whatever the batch and its order
    assert len(set(together)) == 6                     # seeded per row, not one draw for all
    assert sum(parse_written(t, coco_vocab)[1] is None for t in together) >= 3   # it learnt the format


def test_random_writer_fails_in_one_line_with_nothing_written(tiny_models, writer_models, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_yaml(tiny_models, tmp_path, str(out))
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "generate", cfg, "--set", "prompts.source=llm",
         "--set", f"prompts.writer.model={writer_models['random']}", "--set", "prompts.num_prompts=4",
         "--set", "prompts.writer.max_new_tokens=24", "--set", "pools.prompts.num_cpus=0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("synthalign:")]
    assert len(err) == 1
    assert err[0].startswith("synthalign: error: field 'prompts.writer.model': the writer wrote no usable prompt "
                             "in 4 tries (missing_")
    assert not (out / "prompts").exists() and not list(out.glob(".prompts*"))
    assert not list((out / "scored").glob("*.parquet")) if (out / "scored").exists() else True
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
