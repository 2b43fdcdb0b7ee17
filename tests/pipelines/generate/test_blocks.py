"""Blocks and images batches are cut at whole diffusers calls: ImageSynthesis pads every call to images.batch_size,
so a run renders its candidates plus at most one partial call (one per guidance scale) at the stream's end."""
from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest
from conftest import ROOT, tiny_config

from pipelines.config import load_config
from pipelines.generate.chain import images_batch_rows, rows_per_block
from pipelines.generate.source import PromptSource


def ray_batches(blocks: list[int], batch_size: int) -> list[int]:
    """Rows per actor call as Ray Data's map_batches cuts them: input blocks are bundled until they hold
    batch_size rows (min_rows_per_bundle), and each bundle is cut into batches of batch_size, the last short."""
    out, bundle = [], 0
    for rows in blocks + [None]:
        if rows is not None:
            bundle += rows
        if bundle and (rows is None or bundle >= batch_size):
            out += [batch_size] * (bundle // batch_size) + ([bundle % batch_size] if bundle % batch_size else [])
            bundle = 0
    return out


def padded_renders(cfg, batches: list[int]) -> int:
    """Images rendered beyond the candidates: ImageSynthesis cuts a batch's rows x per_scale slots into calls of
    images.batch_size, pads the last, and renders every slot group once per guidance scale."""
    im = cfg.images
    b, scales = im.batch_size, len(im.guidance_scales)
    rendered = sum(-(-rows * im.per_scale // b) * b * scales for rows in batches)
    return rendered - sum(batches) * im.num_candidates


def blocks_of(cfg, n: int) -> list[int]:
    """The block sizes the run makes: the prompt source's plan, cut by the chain's rows_per_block."""
    cfg.prompts.num_prompts = n
    plan = PromptSource.checked(cfg.prompts).plan({}, lambda todo: rows_per_block(cfg, todo))
    return [b["rows"] for b in plan.blocks]


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("n, per_stage_block, fused_block", [(300, 4, 20), (4001, 8, 32), (9000, 12, 32)])
def test_paper_blocks_are_whole_diffusers_calls(fuse, n, per_stage_block, fused_block):
    """paper.yaml (4 images actors, 4 rows a batch, 4 images a call): 9,000 prompts made 9-row blocks (batches of
    4, 4, 1: a third more SD3 renders than candidates), 4,001 made 5-row blocks (60% more); the fused chain's
    19-row blocks at 300 prompts (2 actors) padded once per block."""
    cfg = load_config(ROOT / "configs" / "paper.yaml", ["output_dir=x", f"fuse={str(fuse).lower()}"])
    if fuse:
        cfg.pools["images"].size = 2 if n == 300 else cfg.pools["images"].size
    blocks = blocks_of(cfg, n)
    size = fused_block if fuse else per_stage_block
    assert blocks[:-1] == [size] * (len(blocks) - 1) and 0 < blocks[-1] <= size and sum(blocks) == n
    assert len(blocks) <= 1000
    batches = ray_batches(blocks, images_batch_rows(cfg))
    assert sum(batches) == n
    short = [r for r in batches if r % 4]
    assert len(short) <= 1, short                 # only the stream's last batch can be short
    scales, b = len(cfg.images.guidance_scales), cfg.images.batch_size
    padded = padded_renders(cfg, batches)
    assert padded == (-n % b) * scales            # 300, 9,000: none; 4,001: one call of 1 image, 3 copies a scale
    assert padded <= cfg.pools["images"].size * (b - 1) * scales   # at most one partial call per image actor


@pytest.mark.parametrize("images_batch, per_scale, pool_batch, want", [(4, 1, 4, 4), (8, 1, 4, 8), (4, 2, 4, 4),
                                                                        (4, 2, 3, 4), (6, 4, 5, 6), (3, 1, 7, 9)])
def test_images_batches_round_up_to_whole_calls(images_batch, per_scale, pool_batch, want):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["output_dir=x", f"images.batch_size={images_batch}",
                                                      f"images.per_scale={per_scale}",
                                                      f"pools.images.batch_size={pool_batch}"])
    assert images_batch_rows(cfg) == want and want * per_scale % images_batch == 0
    for n in (1, 24, 300, 9000):
        assert rows_per_block(cfg, n) % want == 0


def test_shapes_and_the_tiny_default_keep_their_blocks():
    """The tiny default's blocks and batches are those it always had (4 rows), fused or not: its output is
    unchanged; the shapes backend draws one image a call, nothing to pad."""
    tiny = load_config(ROOT / "configs" / "tiny.yaml", ["output_dir=x"])
    assert (images_batch_rows(tiny), rows_per_block(tiny, 24)) == (4, 4)
    tiny.fuse = False
    assert (images_batch_rows(tiny), rows_per_block(tiny, 24)) == (4, 4)
    shapes = load_config(ROOT / "configs" / "shapes.yaml", ["output_dir=x"])
    assert images_batch_rows(shapes) == shapes.pool("images").batch_size == 16


def counting_images(log_dir: str):
    """ImageSynthesis logging each diffusers call's size and distinct slots (a padded copy repeats the last
    slot's seed). Defined in a function so Ray pickles it by value into the actors."""
    import os

    from actors.images import ImageSynthesis

    class CountingImages(ImageSynthesis):
        def render_batch(self, prompts, seeds, guidance):
            with open(f"{log_dir}/{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps({"n": len(seeds), "distinct": len(set(seeds))}) + "\n")
            return super().render_batch(prompts, seeds, guidance)
    return CountingImages


def calls(log_dir) -> list[dict]:
    return [json.loads(line) for f in sorted(log_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]


SCORES = ("image_score", "candidate_scores", "chosen_reward", "rejected_reward", "margin")


def pairs(cfg):
    t = pads.dataset(f"{cfg.output_dir}/pairs", format="parquet").to_table().sort_by("pair_id")
    return t.drop_columns(["stage_nodes"]).to_pylist()   # node ids differ between Ray sessions


def test_a_tiny_run_renders_no_padding_and_the_same_pairs(tiny_models, ray_local, tmp_path, monkeypatch):
    """tiny.yaml with 8 images a diffusers call: the chain used to hand the images stage 4-row batches (half of
    every call padded); now 8-row batches. The pairs are those of the old cutting: images, answers, which answer is
    chosen, byte for byte (an image is a function of config and row); the scores to float rounding, as the
    fused chain's CLIP and reward model now see 8 prompts a batch instead of 4. (The tiny default keeps its
    4-row blocks: its pairs are byte-identical, scores included.)"""
    import pipelines.generate.chain as chain
    import pipelines.generate.job as job
    from pipelines.generate.job import run_generate
    n, sets = 24, {"prompts.num_prompts": 24, "images.batch_size": 8}
    logs = {k: tmp_path / f"log-{k}" for k in ("new", "old")}
    for d in logs.values():
        d.mkdir()
    new = tiny_config(tiny_models, tmp_path / "new", **sets)
    run_generate(new, swap={"images": counting_images(str(logs["new"]))})
    got = calls(logs["new"])
    assert {c["n"] for c in got} == {8} and all(c["distinct"] == 8 for c in got)
    assert sum(c["n"] for c in got) == n * new.images.num_candidates        # not one padded render

    # the old cutting: blocks and batches of pools.images.batch_size rows, whatever the call size
    old = tiny_config(tiny_models, tmp_path / "old", **sets)
    monkeypatch.setattr(chain, "images_batch_rows", lambda cfg: cfg.pool("images").batch_size)
    monkeypatch.setattr(job, "rows_per_block", lambda cfg, todo: 4)
    run_generate(old, swap={"images": counting_images(str(logs["old"]))})
    before = calls(logs["old"])
    assert sum(c["n"] - c["distinct"] for c in before) == n * old.images.num_candidates   # as many padded
    got, want = pairs(new), pairs(old)
    assert len(got) == len(want) > 0
    assert [{k: v for k, v in r.items() if k not in SCORES} for r in got] == \
        [{k: v for k, v in r.items() if k not in SCORES} for r in want]
    for r, w in zip(got, want):
        assert all(r[k] == pytest.approx(w[k], abs=1e-4) for k in SCORES), r["pair_id"]
