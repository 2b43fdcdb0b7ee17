"""A generate run's figures reach TensorBoard (`train.report_to`): the manifest's counts as scalars, the answers'
rewards and the pairs' margins as histograms; `none` writes nothing; an S3 output_dir gets the events uploaded."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import tiny_config

from pipelines.layout import RunLayout

N_PROMPTS, N_INSTR = 3, 2


def events(folder) -> tuple[list[Path], object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = sorted(Path(folder).glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return files, acc


def scalar(acc, tag: str) -> tuple[int, float]:
    (e,) = acc.Scalars(tag)   # one point per run
    return e.step, e.value


def copy_run(src: str, dest: Path) -> Path:
    """The run's data without its events: a folder a second invocation resumes with nothing left to do."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("tb"))
    return dest


@pytest.fixture(scope="module")
def run(tiny_models, ray_local, tmp_path_factory):
    from pipelines.generate.job import run_generate
    out = tmp_path_factory.mktemp("track") / "run"
    cfg = tiny_config(tiny_models, out, **{"prompts.num_prompts": N_PROMPTS,
                                            "prompts.instructions_per_prompt": N_INSTR})
    assert cfg.train.report_to == ["tensorboard"]   # the default
    return cfg, run_generate(cfg)


def test_events_hold_the_manifest_counts_and_the_histograms(run):
    cfg, manifest = run
    c, timings = manifest["counts"], manifest["timings_s"]
    tb = RunLayout(cfg.output_dir).generate_tb
    assert str(tb) == str(Path(cfg.output_dir) / "tb" / "generate")
    files, acc = events(tb.local)
    assert len(files) == 1
    for k in ("prompts", "questions", "answers", "pairs", "errors", "images_rendered", "prompts_resumed"):
        assert scalar(acc, f"generate/{k}") == (0, float(c[k])), k
    assert c["questions"] == N_PROMPTS * N_INSTR and c["answers"] == 3 * c["questions"]
    tags = acc.Tags()["scalars"]
    dropped = {t.split("/", 2)[2]: scalar(acc, t)[1] for t in tags if t.startswith("generate/dropped/")}
    assert dropped == {r: float(n) for r, n in c["dropped"].items()}
    assert scalar(acc, "timings/stream")[1] == pytest.approx(timings["stream"])
    assert scalar(acc, "rate/questions_per_s")[1] == pytest.approx(c["questions"] / timings["stream"], rel=1e-6)
    assert scalar(acc, "rate/pairs_per_s")[1] == pytest.approx(c["pairs"] / timings["stream"], rel=1e-6)

    rewards = pads.dataset(f"{cfg.output_dir}/candidates").to_table(["reward"]).column("reward").to_pylist()
    (h,) = acc.Histograms("generate/reward")
    assert h.step == 0 and h.histogram_value.num == len(rewards) == c["answers"]
    assert h.histogram_value.min == pytest.approx(min(rewards)) and h.histogram_value.max == pytest.approx(max(rewards))
    assert h.histogram_value.sum == pytest.approx(sum(rewards), rel=1e-5, abs=1e-6)
    margins = pads.dataset(f"{cfg.output_dir}/pairs").to_table(["margin"]).column("margin").to_pylist()
    (m,) = acc.Histograms("generate/margin")
    assert m.histogram_value.num == len(margins) == c["pairs"]
    assert m.histogram_value.sum == pytest.approx(sum(margins), rel=1e-5, abs=1e-6)


def test_scalars_name_each_drop_reason_and_rate_only_a_fresh_stream():
    from pipelines.generate.tracking import scalars
    counts = {"questions": 10, "answers": 30, "pairs": 7, "errors": 0, "images_rendered": 20, "prompts_resumed": 0,
              "dropped": {"below_margin": 2, "identical": 1}}
    timings = {"stream": 4.0, "total": 9.5, "model_load_by_stage": {"RewardScorer": 1.5}}
    got = scalars({"counts": counts, "timings_s": timings})
    assert {k: v for k, v in got.items() if k.startswith("generate/dropped/")} == {
        "generate/dropped/below_margin": 2.0, "generate/dropped/identical": 1.0}
    assert got["timings/total"] == 9.5 and got["timings/model_load/RewardScorer"] == 1.5
    assert (got["rate/questions_per_s"], got["rate/pairs_per_s"], got["rate/images_per_s"]) == (2.5, 1.75, 5.0)
    resumed = scalars({"counts": {**counts, "prompts_resumed": 3}, "timings_s": timings})
    assert [k for k in resumed if k.startswith("rate/")] == ["rate/images_per_s"]


def test_report_to_none_writes_nothing(run, tmp_path):
    import copy

    from pipelines.generate.job import run_generate
    cfg, manifest = run
    again = copy.deepcopy(cfg)
    again.output_dir = str(copy_run(cfg.output_dir, tmp_path / "run"))
    again.train.report_to = ["none"]
    m = run_generate(again)
    assert m["counts"]["prompts_resumed"] == N_PROMPTS
    assert not (tmp_path / "run" / "tb").exists()


def test_a_resumed_run_replaces_its_events_and_reports_no_rates(run, tmp_path):
    """The counts are the whole folder's: a second invocation leaves one events file, its rates left out (its
    stream did none of the rows its counts hold)."""
    import copy

    from pipelines.generate.job import run_generate
    cfg, manifest = run
    again = copy.deepcopy(cfg)
    again.output_dir = str(tmp_path / "run")
    shutil.copytree(cfg.output_dir, again.output_dir)   # the first invocation's events too
    m = run_generate(again)
    files, acc = events(RunLayout(again.output_dir).generate_tb.local)
    assert len(files) == 1
    assert scalar(acc, "generate/prompts_resumed") == (0, float(N_PROMPTS))
    assert scalar(acc, "generate/pairs")[1] == m["counts"]["pairs"] == manifest["counts"]["pairs"]
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("rate/") and t != "rate/images_per_s"]
    assert acc.Histograms("generate/reward")[0].histogram_value.num == manifest["counts"]["answers"]


def test_a_round_folder_reports_its_round_as_the_step(run, tmp_path):
    from pipelines.generate.tracking import report_generate
    cfg, manifest = run
    layout = RunLayout(RunLayout(tmp_path / "top").round_dir(2).uri)
    copy_run(cfg.output_dir, Path(layout.root.path))
    assert report_generate(layout, ["tensorboard", "none"], manifest) == ["tensorboard"]
    _, acc = events(layout.generate_tb.local)
    assert scalar(acc, "generate/questions") == (2, float(manifest["counts"]["questions"]))
    assert acc.Histograms("generate/margin")[0].step == 2


def test_a_tracking_failure_is_logged_not_raised(run, tmp_path, caplog):
    from pipelines.generate.tracking import report_generate
    cfg, manifest = run
    folder = copy_run(cfg.output_dir, tmp_path / "run")
    (folder / "tb").write_text("a file where the events folder goes")
    assert report_generate(RunLayout(folder), ["tensorboard"], manifest) == []
    (line,) = [r.getMessage() for r in caplog.records if r.name == "pipelines.generate.tracking"]
    assert line.startswith("generate metrics not sent to tensorboard: ") and "\n" not in line


@pytest.mark.slow
def test_object_storage_output_gets_the_events_uploaded(run, s3_server, tmp_path, monkeypatch):
    from cluster.storage import Location
    from pipelines.generate.tracking import report_generate
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    cfg, manifest = run
    remote = RunLayout(f"{s3_server['bucket']()}/run")
    for view in ("pairs", "candidates"):
        for f in Location(Path(cfg.output_dir) / view).glob("part-*.parquet"):
            (getattr(remote, view) / f.name).write_bytes(f.read_bytes())
    assert report_generate(remote, ["tensorboard"], manifest) == ["tensorboard"]
    (obj,) = remote.generate_tb.glob("events.out.tfevents.*")
    (tmp_path / obj.name).write_bytes(obj.read_bytes())
    _, acc = events(tmp_path)
    assert scalar(acc, "generate/answers") == (0, float(manifest["counts"]["answers"]))
    assert acc.Histograms("generate/reward")[0].histogram_value.num == manifest["counts"]["answers"]
