"""One stage list drives every wiring: the contract check sees the chain that runs, reordered or swapped."""
from __future__ import annotations

import pytest
from conftest import ROOT

from actors.contract import STAGES, ContractError
from actors.rewards import load_vocab
from pipelines.config import load_config
from pipelines.generate.chain import check_steps, steps


def tiny():
    return load_config(ROOT / "configs" / "tiny.yaml", ["output_dir=x"])


def test_steps_follow_the_stage_list_and_the_config():
    cfg = tiny()
    run = steps(cfg, vocab=None)
    assert [s.name for s in run] == ["ImageSynthesis", "ImageSelection", "AnswerSampler", "AnswerSampler",
                                     "RewardScorer"]
    assert [c.__name__ for s in run for c in s.classes][-1] == "PairBuilder"
    assert [s.parts[0][1]["cfg"].label for s in run[2:4]] == ["tiny-llava-a", "tiny-llava-b"]   # one per sampler
    assert run[0].pool.batch_size == cfg.pool("images").batch_size
    check_steps(run)


def test_reordering_the_stage_list_breaks_the_contract_check():
    reordered = (STAGES[0], STAGES[2], STAGES[1], STAGES[3])   # sampling before selection: no `image` yet
    with pytest.raises(ContractError, match="AnswerSampler needs column"):
        check_steps(steps(tiny(), None, stages=reordered))
    with pytest.raises(ContractError, match="RewardScorer"):
        check_steps(steps(tiny(), None, stages=STAGES[:2] + STAGES[3:]))   # no sampler: no `answers`


def test_a_swapped_stand_in_is_checked_too():
    class NoImages:
        REQUIRES, ADDS = ("prompt_id",), ("nothing",)

        def __init__(self, cfg, threads=1):
            pass
    with pytest.raises(ContractError, match="ImageSelection needs column"):
        check_steps(steps(tiny(), None, swap={"images": NoImages}))


def test_the_pipeline_refuses_a_broken_chain_before_ray_runs_anything():
    import pyarrow as pa

    from pipelines.generate.chain import build_pipeline
    cfg = tiny()
    with pytest.raises(ContractError):
        build_pipeline(cfg, pa.table({"prompt_id": ["p"]}), load_vocab(cfg.rewards),
                       stages=(STAGES[0], STAGES[2], STAGES[1], STAGES[3]))


@pytest.mark.parametrize("n_prompts, size", [(24, 4), (128, 8), (512, 32), (2048, 32), (100_000, 100)])
def test_blocks_grow_with_the_run_from_one_to_eight_image_batches(n_prompts, size):
    """tiny.yaml: 2 image actors, 4 prompts per images batch. Small runs keep one-batch blocks (the first pair
    early), larger ones up to eight batches (less per-block cost), the largest ~1,000 blocks (the driver's list)."""
    from pipelines.generate.chain import rows_per_block
    assert rows_per_block(tiny(), n_prompts) == size
    assert -(-n_prompts // size) <= 1000


def test_per_stage_pools_keep_one_images_batch_per_block():
    # fuse: false (paper.yaml's shape): every later pool gets rows as soon as one images batch is through
    from pipelines.generate.chain import rows_per_block
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["output_dir=x", "fuse=false"])
    assert [rows_per_block(cfg, n) for n in (24, 512, 2048, 100_000)] == [4, 4, 4, 100]
