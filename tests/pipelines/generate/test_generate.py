"""`generate` end to end on a real local Ray with the tiny models."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import METRICS_PORT, tiny_config
from PIL import Image

from actors.contract import PAIR_COLUMNS

N_PROMPTS, N_INSTR = 6, 2


def read(path, columns=None):
    return pads.dataset(str(path), format="parquet").to_table(columns=columns)


@pytest.fixture(scope="module")
def run(tiny_models, ray_local, tmp_path_factory):
    from cluster.connect import connect
    from pipelines.generate.job import run_generate
    t0 = time.time()
    out = tmp_path_factory.mktemp("gen") / "run"
    cfg = tiny_config(tiny_models, out, **{"prompts.num_prompts": N_PROMPTS,
                                            "prompts.instructions_per_prompt": N_INSTR})
    t = time.time()
    connect()   # as the CLI does (the session's Ray is up already)
    clock = {"command_start": t0, "launch": round(t - t0, 2), "ray_start": round(time.time() - t, 2)}
    return cfg, run_generate(cfg, clock=clock)


def test_row_counts_and_manifest(run):
    cfg, manifest = run
    c = manifest["counts"]
    assert c["prompts"] == N_PROMPTS
    assert c["questions"] == N_PROMPTS * N_INSTR
    assert c["answers"] == c["questions"] * 3  # sampler a: n=2, sampler b: n=1
    assert c["images_rendered"] == N_PROMPTS * 4
    assert c["errors"] == 0 and c["duplicates_skipped"] == 0
    assert c["pairs"] + sum(c["dropped"].values()) == c["questions"]
    assert c["pairs"] > 0
    pairs = read(f"{cfg.output_dir}/pairs")
    assert pairs.num_rows == c["pairs"]
    assert len(set(pairs.column("pair_id").to_pylist())) == pairs.num_rows
    cands = read(f"{cfg.output_dir}/candidates")
    assert cands.num_rows == c["answers"]
    on_disk = json.loads(open(f"{cfg.output_dir}/manifest.json").read())
    assert on_disk["data_hash"] == cfg.hash() and on_disk["versions"]["ray"] == "2.60.0"
    assert on_disk["status"] == "complete"


def test_manifest_times_startup_and_the_first_pair(run):
    """The startup breakdown: figures present and consistent with each other (never their size: timings on a
    shared machine say nothing; docs/results.md has measured ones)."""
    cfg, manifest = run
    t = manifest["timings_s"]
    for key in ("actor_start", "model_load", "actors_ready", "first_pair", "stream", "total", "command"):
        assert t[key] > 0, key
    assert t["ray_start"] >= 0 and t["launch"] >= 0
    assert t["actor_start"] < t["actors_ready"] < t["stream"] and t["model_load"] < t["actors_ready"]
    assert t["launch"] + t["ray_start"] + t["prepare"] < t["first_pair"] < t["command"]   # from the command's start
    assert t["stream"] < t["total"] <= t["command"]
    loads = t["model_load_by_stage"]
    assert set(loads) == {"ImageSynthesis", "ImageSelection", "QuestionExpander", "AnswerSampler:tiny-llava-a",
                          "AnswerSampler:tiny-llava-b", "RewardScorer", "PairBuilder"}
    assert loads["AnswerSampler:tiny-llava-a"] > 0 and max(loads.values()) <= t["model_load"]
    assert t["actors_start_cpu"] > 0   # CPU-s of the actors until ready: at least their imports
    assert len(list((Path(cfg.output_dir) / ".startup").glob("*.json"))) == cfg.pool("images").size  # fused


def test_pairs_columns_images_and_margins(run):
    cfg, _ = run
    pairs = read(f"{cfg.output_dir}/pairs").to_pylist()
    assert set(PAIR_COLUMNS) <= set(pairs[0])
    for p in pairs:
        img = Image.open(io.BytesIO(p["image"]))
        assert img.format == "PNG" and img.size == (64, 64)
        assert p["chosen_reward"] - p["rejected_reward"] >= cfg.pairs.min_margin
        assert p["margin"] == pytest.approx(p["chosen_reward"] - p["rejected_reward"])
        assert p["chosen"] != p["rejected"] and p["chosen"].strip() and p["rejected"].strip()
        assert p["chosen_model"] in ("tiny-llava-a", "tiny-llava-b")
        assert p["guidance_scale"] in cfg.images.guidance_scales
        # the kept image is the best-scored candidate, and its seed/scale are recorded
        best = max(range(4), key=lambda k: p["candidate_scores"][k])
        assert p["image_score"] == pytest.approx(p["candidate_scores"][best])
        assert p["seed"] == p["candidate_seeds"][best]
        assert set(p["gt_objects"]) and all(o in p["image_prompt"] or o.split()[0] in p["image_prompt"]
                                            for o in p["gt_objects"])


def test_candidates_carry_every_reward_term(run):
    cfg, _ = run
    cands = read(f"{cfg.output_dir}/candidates").to_pylist()
    for col in ("reward_text", "reward_clip", "reward_hallucination", "reward", "model", "answer", "role"):
        assert col in cands[0]
    pairs = {p["pair_id"]: p for p in read(f"{cfg.output_dir}/pairs").to_pylist()}
    for c in cands:
        assert c["reward_hallucination"] == -len(c["hallucinated"])
        if c["pair_key"] in pairs and c["role"] == "chosen":
            assert c["answer"] == pairs[c["pair_key"]]["chosen"]


def test_loads_with_datasets_and_converts_for_trl(run):
    import datasets
    cfg, manifest = run
    ds = datasets.load_dataset("parquet", data_files=f"{cfg.output_dir}/pairs/*.parquet", split="train")
    assert len(ds) == manifest["counts"]["pairs"]
    assert ds[0]["image"][:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_per_stage_pools_gives_identical_bytes(run, tiny_models, tmp_path):
    """tiny.yaml fuses the stages into one actor; a pool per stage and other batching give the same bytes."""
    from pipelines.generate.job import run_generate
    cfg, _ = run
    assert cfg.fuse
    again = tiny_config(tiny_models, tmp_path / "again", **{
        "prompts.num_prompts": N_PROMPTS, "prompts.instructions_per_prompt": N_INSTR,
        "fuse": "false", "pools.images.batch_size": 3})
    run_generate(again)
    a = {r["pair_key"]: r for r in read(f"{cfg.output_dir}/scored").to_pylist()}
    b = {r["pair_key"]: r for r in read(f"{again.output_dir}/scored").to_pylist()}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["image"] == b[k]["image"]
        assert a[k]["answers"] == b[k]["answers"]


def test_other_config_in_same_output_dir_is_refused(run):
    from actors.common.errors import InputError
    from pipelines.generate.job import run_generate
    cfg, _ = run
    cfg2 = tiny_config({k: v for k, v in _tiny_from(cfg).items()}, cfg.output_dir,
                       **{"prompts.num_prompts": N_PROMPTS + 1})
    before = sorted(p.name for p in __import__("pathlib").Path(cfg.output_dir, "pairs").iterdir())
    with pytest.raises(InputError, match="another config"):
        run_generate(cfg2)
    after = sorted(p.name for p in __import__("pathlib").Path(cfg.output_dir, "pairs").iterdir())
    assert before == after


def _tiny_from(cfg):
    from pathlib import Path
    return {"sd": Path(cfg.images.model), "clip": Path(cfg.selection.model),
            "reward": Path(cfg.rewards.text_model), "llava": Path(cfg.samplers[0].model),
            "llava-b": Path(cfg.samplers[1].model)}


def test_jsonl_prompts_source(tiny_models, ray_local, tmp_path):
    from pipelines.generate.job import run_generate
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt_id": "cat-1", "image_prompt": "a photo of a cat on a couch",
         "instructions": ["Describe the image.", "What animal is this?"]},
        {"prompt_id": "dog-1", "image_prompt": "two dogs in a park", "instruction": "How many dogs?",
         "gt_objects": ["dog"]},
    ]) + "\n")
    cfg = tiny_config(tiny_models, tmp_path / "run", **{"prompts.source": "file", "prompts.file": str(f)})
    m = run_generate(cfg)
    assert m["counts"]["prompts"] == 2 and m["counts"]["questions"] == 3
    scored = read(tmp_path / "run" / "scored", ["pair_key", "gt_objects", "question"]).to_pylist()
    keys = {r["pair_key"]: r for r in scored}
    assert set(keys) == {"cat-1-q0", "cat-1-q1", "dog-1-q0"}
    # gt_objects from the prompt text (COCO synonyms) when the file does not give them
    assert set(keys["cat-1-q0"]["gt_objects"]) == {"cat", "couch"}
    assert keys["dog-1-q0"]["question"] == "How many dogs?"


def test_text_prompts_with_instruction_file(tiny_models, ray_local, tmp_path):
    from pipelines.generate.job import run_generate
    (tmp_path / "p.txt").write_text("a red bus on a street\n\na bowl of apples on a table\n")
    (tmp_path / "i.txt").write_text("What color is the bus?\nHow many apples are there?\n")
    cfg = tiny_config(tiny_models, tmp_path / "run", **{
        "prompts.source": "file", "prompts.file": str(tmp_path / "p.txt"),
        "prompts.instructions_file": str(tmp_path / "i.txt")})
    m = run_generate(cfg)
    assert m["counts"]["questions"] == 2
    rows = {r["prompt_id"]: r for r in read(tmp_path / "run" / "scored",
                                            ["prompt_id", "question", "gt_objects"]).to_pylist()}
    assert rows["p-0000001"]["question"] == "What color is the bus?"
    assert rows["p-0000003"]["question"] == "How many apples are there?"
    assert set(rows["p-0000003"]["gt_objects"]) == {"bowl", "apple", "dining table"} or \
        {"bowl", "apple"} <= set(rows["p-0000003"]["gt_objects"])


def test_export_llava_json(run, tmp_path):
    from pipelines.report.export import export_llava_json
    cfg, manifest = run
    path = export_llava_json(cfg.output_dir, tmp_path / "llava")
    records = json.loads(path.read_text())
    assert len(records) == manifest["counts"]["pairs"]
    r = records[0]
    assert set(r) == {"id", "image", "conversations", "rejected_conversations"}
    assert r["conversations"][0]["value"].startswith("<image>\n")
    assert r["conversations"][0] == r["rejected_conversations"][0]
    assert r["conversations"][1]["value"] != r["rejected_conversations"][1]["value"]
    assert Image.open(tmp_path / "llava" / r["image"]).size == (64, 64)


def scrape() -> str:
    import urllib.request
    return urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()


def stage_counters(text: str) -> dict[tuple[str, str], float]:
    """(counter, stage) -> value summed over the workers' series."""
    import re
    out: dict = {}
    series = r'^ray_synthalign_(stage_rows|stage_failed_rows)_total\{[^}]*stage="([^"]+)"[^}]*\} ([0-9.e+]+)'
    for m in re.finditer(series, text, re.M):
        out[m.group(1), m.group(2)] = out.get((m.group(1), m.group(2)), 0) + float(m.group(3))
    return out


def settled_counters(timeout: float = 60.0) -> dict:
    """The counters once two reads 5 s apart agree: the session's earlier runs have finished reporting."""
    import time
    deadline, last = time.time() + timeout, stage_counters(scrape())
    while time.time() < deadline:
        time.sleep(5)
        now = stage_counters(scrape())
        if now == last:
            break
        last = now
    return last


def test_stage_metrics_count_exactly_the_rows_each_stage_processed(tiny_models, ray_local, tmp_path):
    """One row fails for good at the first sampler: it counts as failed there and nowhere else; every stage
    counts the rows it processed, the rows that failed upstream and only passed through count for none."""
    import time
    import uuid

    from actors.prompts import load_prompts
    from pipelines.generate.job import run_generate
    n_prompts = 4
    cfg = tiny_config(tiny_models, tmp_path / "run", **{"prompts.num_prompts": n_prompts})
    victim = [r["prompt_id"] for r in load_prompts(cfg.prompts)][1]
    cfg = tiny_config(tiny_models, tmp_path / "run", **{
        "prompts.num_prompts": n_prompts, "faults.stage": "sampling", "faults.kind": "raise", "faults.times": -1,
        "faults.prompt_ids": json.dumps([victim]), "max_error_fraction": 0.5})
    tag = uuid.uuid4().hex[:8]  # sampler stage tags of this run only
    a, b = cfg.samplers[0], cfg.samplers[1]
    a.name, b.name = f"a-{tag}", f"b-{tag}"
    before = settled_counters()
    counts = run_generate(cfg)["counts"]
    questions = n_prompts * N_INSTR
    assert counts["errors"] == N_INSTR and counts["questions"] == questions  # the victim's image-questions
    ok = questions - N_INSTR
    want = {("stage_rows", "images"): n_prompts, ("stage_failed_rows", "images"): 0,
            ("stage_rows", "selection"): n_prompts, ("stage_failed_rows", "selection"): 0,
            ("stage_rows", f"sampling:{a.name}"): ok, ("stage_failed_rows", f"sampling:{a.name}"): N_INSTR,
            ("stage_rows", f"sampling:{b.name}"): ok, ("stage_failed_rows", f"sampling:{b.name}"): 0,
            ("stage_rows", "rewards"): ok, ("stage_failed_rows", "rewards"): 0,
            ("stage_rows", "pairs"): ok, ("stage_failed_rows", "pairs"): 0}
    deadline = time.time() + 60
    while True:  # metrics are exported every few seconds
        text = scrape()
        got = {k: stage_counters(text).get(k, 0) - before.get(k, 0) for k in want}
        if got == want or time.time() > deadline:
            break
        time.sleep(3)
    assert got == want
    assert "ray_synthalign_pairs_total" in text and "ray_synthalign_margin_bucket" in text
