"""A run's prompt rows as a Ray Data dataset that the driver never holds.

The driver knows the prompts by their count (`check_prompts`: a file is checked streamed, ids only) and cuts
them into blocks of prompts still to do by streaming them once more: a block is the cursor where its rows start
(`actors.prompts.iter_prompts`), how many rows it spans and the ids among them already done. Ray Data tasks
make the rows from that: the same rows, in the same blocks as slicing the whole list of prompts to do, so the
actors get the same batches; the driver keeps ~1,000 small block descriptions, whatever the number of prompts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from typing import Callable

from actors.prompts import PromptsConfig, check_prompts, iter_prompts
from cluster.resources import task_kwargs
from pipelines.generate.chain import prompt_table


@dataclass
class PromptSource:
    """The checked prompts of a run: where they come from and how many; `mentions` fills file rows' gt_objects."""
    cfg: PromptsConfig
    count: int
    mentions: Callable | None = None
    topics: list[str] | None = None   # source llm: the user's seed topics (None: the default ones)

    @classmethod
    def checked(cls, cfg: PromptsConfig, mentions=None, output_dir=None) -> PromptSource:
        """Bad input raises InputError here, before anything runs (one streamed pass over a file). An llm source
        is checked (writer, topics) but counted only once written (`written`), on Ray."""
        if cfg.source == "llm":
            from pipelines.generate.prompt_writing import check_writer
            return cls(cfg, 0, mentions, check_writer(cfg, output_dir))
        return cls(cfg, check_prompts(cfg), mentions)

    def written(self, run_cfg, folder, vocab) -> tuple[PromptSource, dict | None]:
        """An llm source's prompts, written into the run folder unless already there, read as a file source;
        with the writer's counts (`writer_ran`: whether it ran now). Other sources come back as they are."""
        if self.cfg.source != "llm":
            return self, None
        from pipelines.generate.prompt_writing import ensure_prompts
        file_cfg, counts, ran = ensure_prompts(run_cfg, folder, vocab, self.topics)
        return PromptSource.checked(file_cfg, self.mentions), {**counts, "writer_ran": ran}

    def plan(self, done_questions: dict[str, int], rows_per_block: Callable[[int], int]) -> Plan:
        """Blocks of the prompts not done yet. `done_questions`: good image-questions per prompt already written
        (outputs.question_counts); a prompt is done when it has one per instruction. `rows_per_block(todo)`: the
        prompts to do a block holds."""
        def done(row):
            return done_questions.get(row["prompt_id"], 0) >= len(row["instructions"])
        todo = self.count
        if done_questions:   # a resume: count what is left first (streamed, nothing kept)
            todo = sum(1 for row, _ in iter_prompts(self.cfg) if not done(row))
        size = rows_per_block(todo) if todo else 1
        if self.cfg.source != "file" and not done_questions:   # a generated row is its index: no pass needed
            return Plan([_block(i, min(size, self.count - i), []) for i in range(0, self.count, size)], todo,
                        self.count - todo)
        blocks, start, spanned, skip, taken = [], None, 0, [], 0
        for row, after in iter_prompts(self.cfg):
            spanned += 1
            if done(row):
                skip.append(row["prompt_id"])
            else:
                taken += 1
            if taken == size:
                blocks.append(_block(start, spanned, skip))
                spanned, skip, taken = 0, [], 0
            if not spanned:
                start = after   # the next block starts after this row
        if taken:
            blocks.append(_block(start, spanned, skip))
        return Plan(blocks, todo, self.count - todo)

    def dataset(self, plan: Plan):
        """The rows to do, made by Ray Data tasks from the plan's blocks: one output block per planned block."""
        import ray.data
        ds = ray.data.from_items(plan.blocks, override_num_blocks=len(plan.blocks))
        # Zero CPUs (a pool holding every core must not starve it), so Ray would run one task per block at once
        # (a worker process each: 117 measured at 512 prompts): two tasks at a time keep the pools fed.
        return ds.map_batches(make_rows, batch_size=None, batch_format="pyarrow",
                              fn_kwargs={"cfg": self.cfg, "mentions": self.mentions},
                              compute=ray.data.TaskPoolStrategy(size=2), **task_kwargs(0))


@dataclass
class Plan:
    blocks: list[dict]
    todo: int           # prompts left to do
    done: int           # prompts already complete (a resume)


def _block(start, rows: int, skip: list[str]) -> dict:
    # JSON text: a cursor is an int or a tuple, and a column of empty lists would have no type
    return {"start": json.dumps(start), "rows": rows, "skip": json.dumps(skip)}


def make_rows(batch, cfg: PromptsConfig, mentions=None):
    """A Ray Data task: the prompt rows of planned blocks (a pyarrow table of prompt columns)."""
    rows = []
    for b in batch.to_pylist():
        skip = set(json.loads(b["skip"]))
        rows += [row for row, _ in islice(iter_prompts(cfg, mentions, json.loads(b["start"])), b["rows"])
                 if row["prompt_id"] not in skip]
    return prompt_table(rows)
