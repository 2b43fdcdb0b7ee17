"""`synthalign run configs/tiny.yaml` ends with base vs adapter on held-out generated images (issue 4), and the
generated world's eval set is what it claims: held-out prompts, balanced controlled-POPE questions."""
from __future__ import annotations

import json

from conftest import ROOT, tiny_config
from eval_checks import assert_summary_follows_from_answers


def test_generated_eval_set_is_held_out_and_balanced(tiny_models, tmp_path):
    from actors.prompts import load_prompts
    from pipelines.evaluate.world import generated_eval_set
    cfg = tiny_config(tiny_models, tmp_path / "run", **{"eval.num_images": 5, "eval.questions_per_image": 2})
    data = generated_eval_set(cfg.eval, cfg, seed=cfg.prompts.seed)
    assert len(data["images"]) == len(data["gt_objects"]) == 5
    assert all(im.size == (cfg.images.width, cfg.images.height) for im in data["images"])
    trained = {r["prompt_id"] for r in load_prompts(cfg.prompts)}
    assert len(set(data["prompt_ids"])) == 5 and not trained & set(data["prompt_ids"])
    assert all(all(g in data["vocab"].classes for g in gt) for gt in data["gt_objects"])
    for strategy, rows in data["pope"].items():
        labels = [lab for _, _, lab in rows]
        assert labels.count("yes") == labels.count("no") > 0, strategy
        for i, q, lab in rows:
            obj = data["vocab"].asked_object(q)
            assert (obj in data["gt_objects"][i]) == (lab == "yes"), (strategy, q)
            assert q.endswith("Answer the question using a single word or phrase.")


def test_tiny_run_ends_with_base_vs_adapter_report(tiny_models, ray_local, tmp_path):
    from pipelines.cli import main
    run = tmp_path / "run"
    t = tiny_models
    samplers = "[{model: %s, name: a, n: 2, temperature: 1.0, max_new_tokens: 8}, {model: %s, name: b, n: 1, max_new_tokens: 8}]" % (
        t["llava"], t["llava-b"])
    sets = [f"output_dir={run}", "tiny_models=null", f"images.model={t['sd']}", f"selection.model={t['clip']}",
            f"rewards.text_model={t['reward']}", f"rewards.clip_model={t['clip']}",
            f"train.model={t['llava']}", f"samplers={samplers}",
            "prompts.num_prompts=4", "train.max_steps=2", "train.deepspeed=null",
            "train.workers.num_workers=1", "eval.num_images=3", "eval.caption_tokens=6"]
    argv = ["run", str(ROOT / "configs" / "tiny.yaml"), "--overwrite"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0

    summary = assert_summary_follows_from_answers(run)
    assert summary["world"] == "generated" and summary["images"] == 3
    base = [json.loads(x) for x in (run / "eval" / "answers-base.jsonl").read_text().splitlines()]
    adapter = [json.loads(x) for x in (run / "eval" / "answers-adapter.jsonl").read_text().splitlines()]
    assert [a["question"] for a in base] == [a["question"] for a in adapter]
    assert sum(a["question"] == "Describe this image." for a in base) == 3
    md = (run / "report.md").read_text()
    assert "Not evaluated yet" not in md and "| pope accuracy |" in md and "report/eval.png" in md
    assert (run / "report" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_split_is_other_held_out_images():
    from actors.common import shapes
    from pipelines.evaluate.config import WorldEvalConfig
    from pipelines.evaluate.world import eval_set
    test = eval_set(WorldEvalConfig(num_images=20), seed=3)
    val = eval_set(WorldEvalConfig(num_images=20, split="validation"), seed=3)
    train = {shapes.make_prompt(3, i, "train")["prompt_id"] for i in range(2000)}
    assert len(set(test["prompt_ids"]) | set(val["prompt_ids"])) == 40 and not train & set(val["prompt_ids"])
    assert sum(len(v) for v in val["pope"].values()) > 0 and val["gt_objects"] != test["gt_objects"]
    assert WorldEvalConfig(split="dev").validate()[0].key == "eval.split"
