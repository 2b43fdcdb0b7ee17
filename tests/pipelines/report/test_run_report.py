"""`synthalign report`: markdown + self-contained HTML with valid PNG plots; missing parts are said, not fatal."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.common.errors import InputError
from pipelines.report.report import write_report


def fake_run(root, trained=True, evaluated=True):
    (root / "pairs").mkdir(parents=True)
    pq.write_table(pa.table({"chosen_reward": [1.0, 2.0, 0.5], "rejected_reward": [-1.0, 0.0, 0.1],
                             "margin": [2.0, 2.0, 0.4], "chosen_model": ["a", "b", "a"],
                             "rejected_model": ["b", "a", "b"]}), root / "pairs" / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({"config_hash": "abc", "status": "complete",
                                                    "counts": {"pairs": 3, "questions": 4}}))
    if trained:
        (root / "train").mkdir()
        (root / "train" / "metrics.jsonl").write_text("\n".join(json.dumps(
            {"step": i, "loss": 0.69 - 0.05 * i, "rewards/margins": 0.1 * i, "rewards/accuracies": 0.5})
            for i in range(1, 5)))
    if evaluated:
        (root / "eval").mkdir()
        (root / "eval" / "summary.json").write_text(json.dumps({
            "base": {"pope": {"accuracy": 0.7}, "chair": {"chair_i": 0.4}},
            "adapter": {"pope": {"accuracy": 0.8}, "chair": {"chair_i": 0.2}}}))
    return root


def test_full_report(tmp_path):
    md, html = write_report(fake_run(tmp_path / "run"))
    text = md.read_text()
    for name in ("rewards", "margins", "models", "training", "eval"):
        png = tmp_path / "run" / "report" / f"{name}.png"
        assert f"report/{name}.png" in text
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert "| pope accuracy | 0.700 | 0.800 |" in text and "| chair chair_i | 0.400 | 0.200 |" in text
    assert "4 logged steps; last loss 0.4900" in text
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 5 and "pope accuracy" in page


def test_missing_training_and_eval_are_said(tmp_path):
    md, _ = write_report(fake_run(tmp_path / "run", trained=False, evaluated=False))
    text = md.read_text()
    assert "Not trained yet" in text and "Not evaluated yet" in text
    assert not (tmp_path / "run" / "report" / "training.png").exists()
    assert not (tmp_path / "run" / "report" / "eval.png").exists()


def test_not_a_run(tmp_path):
    with pytest.raises(InputError, match="no manifest.json"):
        write_report(tmp_path)


def test_margins_equal_up_to_rounding_still_plot(tmp_path):
    # z-scored rewards of 3 answers give the same margin in every pair, up to the last bit (a shapes run's pairs);
    # numpy cannot cut a 4e-16 range into 20 bins.
    run = fake_run(tmp_path / "run")
    same = [2.121320343559643, 2.1213203435596424, 2.121320343559643]
    pq.write_table(pa.table({"chosen_reward": [0.7071067811865475, 0.7071067811865476, 0.7071067811865475],
                             "rejected_reward": [-1.4142135623730951, -1.414213562373095, -1.4142135623730951],
                             "margin": same, "chosen_model": ["a"] * 3, "rejected_model": ["b"] * 3}),
                   run / "pairs" / "part-0.parquet")
    md, _ = write_report(run)
    assert Image.open(run / "report" / "margins.png").size[0] > 0 and "report/margins.png" in md.read_text()


def test_training_is_read_as_train_reads_it(tmp_path):
    """The report reads metrics.jsonl with the training's reader: blank lines skipped, an empty file (training
    started, nothing logged yet) is no training yet rather than a plot of nothing."""
    from pipelines.train.job import read_metrics
    run = fake_run(tmp_path / "run")
    metrics = run / "train" / "metrics.jsonl"
    metrics.write_text("\n" + metrics.read_text() + "\n\n")
    assert len(read_metrics(run)) == 4
    assert "4 logged steps; last loss 0.4900" in write_report(run)[0].read_text()
    metrics.write_text("")
    text = write_report(run)[0].read_text()
    assert "Not trained yet" in text and "report/training.png" not in text
