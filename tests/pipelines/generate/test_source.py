"""The run's prompts as a dataset the driver never holds: the plan's blocks give the rows, blocks and resume
filter that slicing the whole list of prompts to do gave (issue 15)."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import tiny_config

from actors.prompts import PromptsConfig, load_prompts
from pipelines.generate.source import PromptSource, make_rows


def mentions(text):
    return [w for w in ("cat", "dog", "bus") if w in text]


def jsonl(tmp_path, n=23):
    f = tmp_path / "p.jsonl"
    lines = [json.dumps({"image_prompt": f"a cat number {i}", "instructions": ["q0", "q1"][: 1 + i % 2],
                         **({"prompt_id": f"id{i}"} if i % 3 else {})}) for i in range(n)]
    lines.insert(5, "   ")      # blank lines count for line numbers (default prompt ids), not as rows
    lines.insert(12, "")
    f.write_text("\ufeff" + "\r\n".join(lines) + "\n")   # a byte-order mark and CRLF too
    return PromptsConfig(source="file", file=str(f))


def text(tmp_path, n=17):
    (tmp_path / "p.txt").write_text("\n".join(f"a dog and a bus {i}" + ("\n" if i == 4 else "") for i in range(n)))
    (tmp_path / "i.txt").write_text("\n\n".join(f"<image> question {i}?" for i in range(n)) + "\n")
    return PromptsConfig(source="file", file=str(tmp_path / "p.txt"), instructions_file=str(tmp_path / "i.txt"))


def blocks_of(source, plan):
    return [make_rows(pa.Table.from_pylist([b]), source.cfg, source.mentions).to_pylist() for b in plan.blocks]


@pytest.mark.parametrize("kind", ["jsonl", "text", "generate", "shapes"])
@pytest.mark.parametrize("resume", [False, True])
def test_plan_blocks_are_the_slices_of_the_prompts_to_do(tmp_path, kind, resume):
    cfg = {"jsonl": lambda: jsonl(tmp_path), "text": lambda: text(tmp_path),
           "generate": lambda: PromptsConfig(num_prompts=21, instructions_per_prompt=2),
           "shapes": lambda: PromptsConfig(source="shapes", num_prompts=19, instructions_per_prompt=2)}[kind]()
    rows = load_prompts(cfg, mentions)
    # A resume: every third prompt complete, the fourth has one of its questions (not done unless it asked one)
    done_questions = {r["prompt_id"]: (len(r["instructions"]) if i % 3 == 0 else 1) for i, r in enumerate(rows)
                      if resume and (i % 3 == 0 or i == 4)}
    todo = [r for r in rows if done_questions.get(r["prompt_id"], 0) < len(r["instructions"])]
    source = PromptSource.checked(cfg, mentions)
    plan = source.plan(done_questions, lambda n: 4 if n == len(todo) else pytest.fail("todo miscounted"))
    assert (source.count, plan.todo, plan.done) == (len(rows), len(todo), len(rows) - len(todo))
    assert blocks_of(source, plan) == [todo[i:i + 4] for i in range(0, len(todo), 4)]
    # the driver keeps block descriptions only: a cursor, a row count and the ids already done
    assert all(set(b) == {"start", "rows", "skip"} and "cat" not in b["start"] for b in plan.blocks)
    if resume:
        assert sum(len(json.loads(b["skip"])) for b in plan.blocks) <= plan.done


def test_prepare_checks_and_counts_the_prompts_without_loading_them(tiny_models, ray_local, tmp_path):
    from pipelines.generate.chain import rows_per_block
    from pipelines.generate.job import prepare
    pcfg = jsonl(tmp_path)
    cfg = tiny_config(tiny_models, tmp_path / "run", **{"prompts.source": "file", "prompts.file": pcfg.file})
    source, vocab, _ = prepare(cfg)
    assert isinstance(source, PromptSource) and source.count == 23
    plan = source.plan({}, lambda n: rows_per_block(cfg, n))
    ds = source.dataset(plan).materialize()   # Ray Data makes the rows, block for block as planned
    assert ds.num_blocks() == len(plan.blocks)
    got = sorted(pa.concat_tables(ray_local.get(ds.to_arrow_refs())).to_pylist(), key=lambda r: r["prompt_id"])
    assert got == sorted(load_prompts(cfg.prompts, vocab.mentions), key=lambda r: r["prompt_id"])
    assert got[0]["gt_objects"] == ["cat"]   # filled from the text by the run's vocabulary, on the workers
