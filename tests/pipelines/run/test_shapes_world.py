"""A short shapes-world run end to end through `synthalign run`: a barely pretrained base, a few prompts, a few
DPO steps on Ray Train, then eval/summary.json whose numbers follow from the recorded answers. The effect size
is the benchmark's business (`python -m benchmarks.shapes`), not this test's."""
from __future__ import annotations

import json

from conftest import ROOT
from eval_checks import assert_summary_follows_from_answers


def test_shapes_run_writes_eval_summary(ray_local, tmp_path):
    from pipelines.cli import main
    from pipelines.models.pretrain import make_shapes_base
    # 40 steps: 5 left answers so alike that every reward tied and no pair was kept (0 of 12; 8 of 12 at 40).
    base = make_shapes_base(tmp_path / "models", spec={"vision_steps": 5, "steps": 40, "batch": 8},
                            guard={"min_held_out_yes_no": 0.0}, log=lambda m: None)   # near chance on purpose
    assert json.loads((base / "pretrain.json").read_text())["steps"] == 40
    run = tmp_path / "run"
    sets = [f"output_dir={run}", "tiny_models=null", f"train.model={base}",
            "samplers=[{model: %s, name: shapes-base, n: 3, temperature: 1.0, max_new_tokens: 8}]" % base,
            "prompts.num_prompts=6", "prompts.instructions_per_prompt=2", "pairs.min_margin=0.0",
            "train.max_steps=2", "train.per_device_batch_size=2", "eval.num_images=4", "eval.caption_tokens=8"]
    argv = ["run", str(ROOT / "configs" / "shapes.yaml"), "--overwrite"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["questions"] == 12
    summary = assert_summary_follows_from_answers(run)
    assert summary["world"] == "shapes" and summary["images"] == 4
    for model in ("base", "adapter"):
        assert set(summary[model]["pope_by_strategy"]) == {"random", "popular", "adversarial"}
    assert (run / "train" / "adapter").is_dir()
    answers = [json.loads(x) for x in (run / "eval" / "answers-adapter.jsonl").read_text().splitlines()]
    assert sum(a["question"] == "Describe this image." for a in answers) == 4
    assert "base vs adapter" in (run / "report.md").read_text()
