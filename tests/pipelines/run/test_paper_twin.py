"""`synthalign run configs/paper-twin.yaml`: the paper's recipe end to end on CPU with twins of its models -
SD3 images, three LLaVA-NeXT samplers, the ArmoRM-style reward, DPO of LLaVA-1.5 under DeepSpeed ZeRO-2 (gloo),
then base vs adapter. A fresh process in a fresh folder, as a user runs it (the twins build on first use)."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.dataset as pads
import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_paper_twin_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "configs" / "paper-twin.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1500,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "paper-twin"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["questions"] == 6
    pairs = pads.dataset(str(run / "pairs")).to_table().to_pylist()
    samplers = {"llava-1.6-mistral-7b", "llava-1.6-vicuna-13b", "llava-1.6-vicuna-7b"}
    assert len(pairs) == manifest["counts"]["pairs"] > 0
    assert all({p["chosen_model"], p["rejected_model"]} <= samplers and p["chosen"] != p["rejected"] for p in pairs)
    assert all(p["guidance_scale"] in (5.0, 7.0, 9.0, 11.0) for p in pairs)
    summary = json.loads((run / "train" / "summary.json").read_text())
    # ZeRO-2 on 2 workers; the recipe's global batch of 2 (1 per worker, no accumulation) over 6 pairs, 1 epoch
    assert summary["deepspeed_stage"] == 2 and summary["world_size"] == 2
    assert summary["gradient_accumulation_steps"] == 1 and summary["steps"] == 3
    assert summary["trainable_in_vision_tower"] == 0 and summary["projector_trained"]
    ev = json.loads((run / "eval" / "summary.json").read_text())
    assert ev["base"]["pope"]["accuracy"] >= 0 and ev["adapter"]["pope"]["accuracy"] >= 0
    assert (run / "report.html").exists()
