"""The CLI as a user meets it: exit codes, one-line errors, JSON output."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import DATA, ROOT


def synthalign(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ""})


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("synthalign: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_config(tmp_path):
    assert_one_line_error(synthalign("generate", tmp_path / "nope.yaml"), "nope.yaml", "not found")


def test_unknown_key_and_debug_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: x\nimages: {modle: y}\n")
    assert_one_line_error(synthalign("generate", cfg), "c.yaml", "images.modle", "unknown key")
    debug = synthalign("--debug", "generate", cfg)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_model_folder_missing_fails_before_ray(tmp_path):
    proc = synthalign("generate", ROOT / "configs" / "tiny.yaml", "--set", "tiny_models=null",
                      "--set", f"images.model={tmp_path}/no-such-model", "--set", f"output_dir={tmp_path}/o")
    assert_one_line_error(proc, "images.model", "model folder not found")
    assert not (tmp_path / "o").exists()


def test_what_runs_before_ray_imports_neither_ray_nor_pandas():
    """`prepare` (where bad input fails) runs before Ray starts; Ray Data and pandas (about 1 CPU-s) are imported on a
    thread while ray.init waits for Ray's processes (cli._ray), off the path to the first pair."""
    code = ("import sys, pipelines.cli; from pipelines.generate.job import prepare; from pipelines.run.job import "
            "prepare_run; print(sorted(m for m in ('ray', 'ray.data', 'pandas', 'pyarrow', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_output_dir_not_writable(tmp_path, tiny_models):
    if os.geteuid() == 0:
        target = "/proc/synthalign-test"  # root can write anywhere else
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "run"
    sets = [f"images.model={tiny_models['sd']}", f"selection.model={tiny_models['clip']}",
            f"rewards.text_model={tiny_models['reward']}", f"rewards.clip_model={tiny_models['clip']}",
            "tiny_models=null", f"output_dir={target}", "samplers=[{model: " + str(tiny_models["llava"]) + "}]"]
    args = [a for s in sets for a in ("--set", s)]
    assert_one_line_error(synthalign("generate", ROOT / "configs" / "tiny.yaml", *args), "not writable")


def test_export_of_missing_run(tmp_path):
    assert_one_line_error(synthalign("export", tmp_path / "none"), "no pairs Parquet files")


def test_pope_score_json(tmp_path):
    questions = DATA / "pope" / "coco_pope_random.json"
    rows = [json.loads(x) for x in questions.read_text().splitlines()[:10]]
    answers = tmp_path / "a.jsonl"
    answers.write_text("\n".join(json.dumps({"question_id": r["question_id"], "text": "Yes, there is."})
                                 for r in rows))
    qfile = tmp_path / "q.json"
    qfile.write_text("\n".join(json.dumps(r) for r in rows))
    proc = synthalign("eval", "pope-score", "--questions", qfile, "--answers", answers, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    n_yes = sum(r["label"] == "yes" for r in rows)
    assert result["n"] == 10 and result["yes_ratio"] == 1.0
    assert result["accuracy"] == pytest.approx(n_yes / 10) and result["recall"] == 1.0


def test_help_imports_no_stage_module():
    """`synthalign --help` (and any command's argument parsing) stays light: no stage module, no torch."""
    code = ("import sys; from pipelines.cli import build_parser; build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'transformers')\n"
            "             or m in ('actors.contract', 'actors.images', 'actors.prompts', 'actors.sampling',\n"
            "                      'actors.rewards', 'actors.select', 'actors.pairs')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
