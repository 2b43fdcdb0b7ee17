"""Bad input, kind by kind: one line naming file/row/field, exit code 2, no traceback, and an existing
run folder left exactly as it was."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from pipelines.cli import main

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """A finished run folder that a failing command must not touch."""
    run = tmp_path / "existing"
    (run / "pairs").mkdir(parents=True)
    pq.write_table(pa.table({"pair_id": ["a"], "chosen": ["x"]}), run / "pairs" / "part-0.parquet")
    (run / "manifest.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "status": "complete"}))
    return run


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write(tmp_path, name, data: bytes | str) -> str:
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


def prompts_case(tmp_path, name, content, **extra):
    f = write(tmp_path, name, content)
    sets = ["--set", "prompts.source=file", "--set", f"prompts.file={f}"]
    for k, v in extra.items():
        sets += ["--set", f"{k}={v}"]
    return ["generate", TINY, *sets]


def pope_files(tmp_path, answers):
    qs = [{"question_id": i, "image": f"img{i}.jpg", "text": "Is there a cat?", "label": "yes"} for i in (1, 2, 3)]
    q = write(tmp_path, "q.jsonl", "\n".join(json.dumps(x) for x in qs))
    a = write(tmp_path, "a.jsonl", "\n".join(json.dumps(x) for x in answers))
    return ["eval", "pope-score", "--questions", q, "--answers", a]


CASES = {
    "missing config file": (lambda t: ["generate", str(t / "none.yaml")], ["none.yaml", "not found"]),
    "yaml syntax error": (lambda t: ["generate", write(t, "c.yaml", "output_dir: x\nprompts: {a: [1\n")],
                          ["c.yaml", "row", "YAML syntax error"]),
    "unknown key": (lambda t: ["generate", TINY, "--set", "images.stepz=2"], ["tiny.yaml", "images.stepz", "unknown key"]),
    "wrong type": (lambda t: ["generate", TINY, "--set", "images.steps=fast"], ["images.steps", "expected int"]),
    "negative count": (lambda t: ["generate", TINY, "--set", "prompts.num_prompts=-5"], ["prompts.num_prompts", "> 0"]),
    "zero count": (lambda t: ["generate", TINY, "--set", "pools.images.batch_size=0"], ["pools.images.batch_size", ">= 1"]),
    "empty guidance list": (lambda t: ["generate", TINY, "--set", "images.guidance_scales=[]"], ["images.guidance_scales"]),
    "bad --set": (lambda t: ["generate", TINY, "--set", "images.steps"], ["--set expects key=value"]),
    "unknown pool stage": (lambda t: ["generate", TINY, "--set", "pools.diffusion.size=2"], ["pools.diffusion", "unknown stage"]),
    "model path missing": (lambda t: ["generate", TINY, "--set", "tiny_models=null",
                                      "--set", f"images.model={t}/missing-sd"], ["images.model", "model folder not found"]),
    "prompts file missing": (lambda t: ["generate", TINY, "--set", "prompts.source=file",
                                        "--set", f"prompts.file={t}/none.jsonl"], ["none.jsonl", "file not found"]),
    "prompts file empty": (lambda t: prompts_case(t, "p.jsonl", ""), ["p.jsonl", "file is empty"]),
    "prompts not utf-8": (lambda t: prompts_case(t, "p.txt", b"a cat\n\xff\xfe dog\n"), ["p.txt", "row 2", "UTF-8"]),
    "prompts missing field": (lambda t: prompts_case(t, "p.jsonl", '{"image_prompt": "a"}\n{"prompt_id": "x"}\n'),
                              ["p.jsonl", "row 2", "field 'image_prompt'"]),
    "duplicate prompt ids": (lambda t: prompts_case(t, "p.jsonl", '{"image_prompt": "a", "prompt_id": "x"}\n'
                                                               '{"image_prompt": "b", "prompt_id": "x"}\n'),
                             ["p.jsonl", "row 2", "field 'prompt_id'", "duplicate"]),
    "instructions count mismatch": (lambda t: prompts_case(t, "p.txt", "a\nb\n", **{
        "prompts.instructions_file": write(t, "i.txt", "q1\n")}), ["i.txt", "1 instructions for 2 prompts"]),
    "pope answer with unknown id": (lambda t: pope_files(t, [{"question_id": i, "text": "yes"} for i in (1, 2, 3, 9)]),
                                    ["a.jsonl", "9"]),
    "pope question without answer": (lambda t: pope_files(t, [{"question_id": 1, "text": "yes"}]), ["2"]),
    "mmhal reviews malformed": (lambda t: ["eval", "mmhal-score", "--reviews",
                                           write(t, "r.json", json.dumps([{"question": "q"}]))], ["r.json"]),
    "pairs missing columns": (lambda t: ["export", _bad_pairs(t)], ["lacks column", "field 'image'"]),
    "image folder missing": (lambda t: ["eval", "pope", "--questions", pope_files(t, [])[3], "--image-dir",
                                        str(t / "no-images"), "--model", "m"], ["no-images", "image folder not found"]),
    "output dir not writable": (lambda t: ["generate", TINY, "--set", "output_dir=/proc/synthalign-x"], ["not writable"]),
    "nothing listening at --address": (lambda t: ["generate", TINY, "--set", f"output_dir={t}/o",
                                                  "--address", "127.0.0.1:9"], ["--address", "nothing is listening"]),
}


def _bad_pairs(t: Path) -> str:
    (t / "badpairs").mkdir()
    pq.write_table(pa.table({"pair_id": ["a"], "question": ["q"]}), t / "badpairs" / "x.parquet")
    return str(t / "badpairs")


def test_there_are_at_least_twenty_kinds():
    assert len(CASES) >= 20


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input(kind, tmp_path, existing_run, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    build, words = CASES[kind]
    argv = build(tmp_path)
    if argv[0] == "generate" and not any(a.startswith("output_dir=") for a in argv):
        argv += ["--set", f"output_dir={existing_run}", "--overwrite"]  # even --overwrite must not touch it
    before = snapshot(existing_run)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("synthalign: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    assert snapshot(existing_run) == before


def test_other_config_in_output_dir_needs_overwrite(existing_run, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = snapshot(existing_run)
    assert main(["generate", TINY, "--set", f"output_dir={existing_run}"]) == 2
    assert "another config" in capsys.readouterr().err
    assert snapshot(existing_run) == before
