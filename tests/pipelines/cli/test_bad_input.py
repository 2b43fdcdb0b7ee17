"""Bad input, kind by kind: one line naming file/row/field, exit code 2, no traceback, and an existing
run folder left exactly as it was."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import traceback
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from pipelines.cli import main

TINY = str(ROOT / "configs" / "tiny.yaml")


def make_existing_run(folder: Path) -> Path:
    """A finished run folder that a failing command must not touch."""
    run = folder / "existing"
    (run / "pairs").mkdir(parents=True)
    pq.write_table(pa.table({"pair_id": ["a"], "chosen": ["x"]}), run / "pairs" / "part-0.parquet")
    (run / "manifest.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "status": "complete"}))
    return run


@pytest.fixture
def existing_run(tmp_path) -> Path:
    return make_existing_run(tmp_path)


def snapshot(folder: Path) -> dict:
    """Every file's bytes, but the run lock's (taken before the checks, so that --overwrite is held too)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


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
    "rounds outside run": (lambda t: ["generate", TINY, "--set", "rounds=2"], ["rounds", "synthalign run"]),
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
    # Undecodable bytes, one case per reader of a user's file: the file and the line of the first bad byte.
    "config not utf-8": (lambda t: ["generate", write(t, "c.yaml", b"output_dir: x\n# caf\xe9\n")],
                         ["c.yaml", "row 2", "not valid UTF-8"]),
    "instructions not utf-8": (lambda t: prompts_case(t, "p.txt", "a\nb\n", **{
        "prompts.instructions_file": write(t, "i.txt", b"q1\n\xffq2\n")}), ["i.txt", "row 2", "not valid UTF-8"]),
    "synonyms file not utf-8": (lambda t: ["generate", TINY, "--set", "rewards.synonyms_file="
                                           + write(t, "syn.txt", b"dog, puppy\ncat, kitty\nc\xe2t\n")],
                                ["syn.txt", "row 3", "not valid UTF-8"]),
    "deepspeed config not utf-8": (lambda t: ["generate", TINY, "--set", "train.deepspeed="
                                              + write(t, "ds.json", b'{\n"zero_optimization": "\xff"}')],
                                   ["train.deepspeed", "ds.json", "line 2", "not valid UTF-8"]),
    "pope questions not utf-8": (lambda t: ["eval", "pope-score", "--questions", write(t, "q.jsonl", (
        b'{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}\n'
        b'{"question_id": 2, "image": "\xff.jpg", "text": "Is there a dog?", "label": "no"}\n')),
        "--answers", write(t, "a.jsonl", '{"question_id": 1, "text": "yes"}\n')], ["q.jsonl", "row 2", "not valid UTF-8"]),
    "pope answers not utf-8": (lambda t: pope_files(t, [])[:5] + [write(t, "a.jsonl", (
        b'{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": "yes"}\n{"question_id": 3, "text": "s\xed"}\n'))],
        ["a.jsonl", "row 3", "not valid UTF-8"]),
    "mmhal template not utf-8": (lambda t: ["eval", "mmhal", "--template", write(t, "t.json", b'[\n{"question": "\xff"}\n]'),
                                            "--image-dir", str(t), "--model", "m", "--judge", "http://127.0.0.1:9"],
                                 ["t.json", "line 2", "not valid UTF-8"]),
    "mmhal reviews not utf-8": (lambda t: ["eval", "mmhal-score", "--reviews", write(t, "r.json", b'[\n\n{"review": "\xe9"}]')],
                                ["r.json", "line 3", "not valid UTF-8"]),
    "auth token file not utf-8": (lambda t: (["jobs", "status", "raysubmit_x", "--address", "http://127.0.0.1:9"],
                                             {"RAY_AUTH_TOKEN_PATH": write(t, "tok", b"\x80\x81\n")}),
                                  ["tok", "row 1", "not valid UTF-8"]),
    "default auth token not utf-8": (lambda t: (["jobs", "status", "raysubmit_x", "--address", "http://127.0.0.1:9"],
                                                {"HOME": _home_with_token(t, b"abc\xff")}),
                                     ["auth_token", "row 1", "not valid UTF-8"]),
}


def _home_with_token(t: Path, token: bytes) -> str:
    (t / "home" / ".ray").mkdir(parents=True)
    (t / "home" / ".ray" / "auth_token").write_bytes(token)
    return str(t / "home")


def _bad_pairs(t: Path) -> str:
    (t / "badpairs").mkdir()
    pq.write_table(pa.table({"pair_id": ["a"], "question": ["q"]}), t / "badpairs" / "x.parquet")
    return str(t / "badpairs")


class Outcome(NamedTuple):
    code: int | None      # None: main() raised
    err: str              # everything written to stderr (a traceback when main() raised)
    lines: list[str]      # the "synthalign: error:" lines, the case's folder written as <tmp>
    untouched: bool       # the existing run folder is exactly as it was


_OUTCOMES: dict[str, Outcome] = {}


def outcome(kind: str, tmp_path_factory) -> Outcome:
    """Run one case through the CLI's main(), once per test session (test_bad_input and the count share it)."""
    if kind in _OUTCOMES:
        return _OUTCOMES[kind]
    t = tmp_path_factory.mktemp("bad")
    existing = make_existing_run(t)
    build, _ = CASES[kind]
    err, code = io.StringIO(), None
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            mp.delenv(name, raising=False)
        argv = build(t)
        if isinstance(argv, tuple):
            argv, env = argv
            for name, value in env.items():
                mp.setenv(name, value)
        if argv[0] == "generate" and not any(a.startswith("output_dir=") for a in argv):
            argv += ["--set", f"output_dir={existing}", "--overwrite"]  # even --overwrite must not touch it
        before = snapshot(existing)
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except BaseException:
                traceback.print_exc()
    text = err.getvalue()
    lines = [ln.replace(str(t), "<tmp>") for ln in text.splitlines() if ln.startswith("synthalign: error:")]
    _OUTCOMES[kind] = Outcome(code, text, lines, snapshot(existing) == before)
    return _OUTCOMES[kind]


def rejected_as_expected(kind: str, o: Outcome) -> bool:
    return o.code == 2 and len(o.lines) == 1 and "Traceback" not in o.err and \
        all(w in o.lines[0] for w in CASES[kind][1])


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input(kind, tmp_path_factory):
    o = outcome(kind, tmp_path_factory)
    assert o.code == 2, o.err
    assert len(o.lines) == 1 and "Traceback" not in o.err, o.err
    for w in CASES[kind][1]:
        assert w in o.lines[0], o.lines[0]
    assert o.untouched


def test_there_are_at_least_twenty_kinds(tmp_path_factory):
    """Counts what the CLI really rejected, not the table's length: every case runs (once per session, shared
    with test_bad_input) and counts when it exits 2 with one line saying what its words say. Every case must
    count, each with a message of its own (a check that stops firing usually lets a later check answer with
    another case's message), and there must be at least twenty."""
    outcomes = {kind: outcome(kind, tmp_path_factory) for kind in CASES}
    rejected = {kind: o.lines[0] for kind, o in outcomes.items() if rejected_as_expected(kind, o)}
    assert set(rejected) == set(CASES), {k: o.err[-300:] for k, o in outcomes.items() if k not in rejected}
    repeated = [m for m in set(rejected.values()) if list(rejected.values()).count(m) > 1]
    assert not repeated, repeated
    assert len(set(rejected.values())) >= 20


def test_other_config_in_output_dir_needs_overwrite(existing_run, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = snapshot(existing_run)
    assert main(["generate", TINY, "--set", f"output_dir={existing_run}"]) == 2
    assert "another config" in capsys.readouterr().err
    assert snapshot(existing_run) == before
