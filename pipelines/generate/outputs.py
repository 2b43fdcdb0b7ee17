"""What a generate run leaves on disk, and how it survives being killed.

`scored/` is the stream's durable log: every shard is written under a temporary name and renamed into
place, so a shard is complete or absent. A rerun skips the prompts whose rows are all there; the views
`pairs/`, `candidates/` and `errors/` are rebuilt from `scored/`, keeping the first row of each
`pair_key`, so a prompt redone after a crash is never counted twice.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from ray.data import Datasink

from actors.common.files import atomic_file, replace_dir
from actors.contract import PAIR_COLUMNS
from actors.rewards import RewardScorer

LINEAGE_COLUMNS = ("question_index", "candidate_scores", "candidate_seeds", "candidate_guidance", "stage_nodes")


class AtomicParquetSink(Datasink):
    """Ray Data sink: one Parquet shard per write call, written to a dot-file and renamed into place."""

    def __init__(self, path: str, rows_per_shard: int):
        self.path, self.rows_per_shard = path, rows_per_shard

    @property
    def min_rows_per_write(self):
        return self.rows_per_shard

    def on_write_start(self, schema=None) -> None:
        os.makedirs(self.path, exist_ok=True)

    def write(self, blocks, ctx):
        import pyarrow as pa
        import pyarrow.parquet as pq
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables, promote_options="permissive")
        with atomic_file(os.path.join(self.path, f"shard-{uuid.uuid4().hex}.parquet")) as tmp:
            pq.write_table(table, tmp)
        return table.num_rows


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.parquet")) if folder.is_dir() else []


def read_shard(path: Path, columns=None):
    import pyarrow.parquet as pq
    if columns is not None:
        names = pq.read_schema(path).names
        columns = [c for c in columns if c in names]
    return pq.read_table(path, columns=columns)


def clean_partial(scored: Path) -> int:
    """Remove temporary files a killed run left behind; returns how many."""
    leftovers = list(scored.glob(".shard-*.tmp")) if scored.is_dir() else []
    for f in leftovers:
        f.unlink(missing_ok=True)
    return len(leftovers)


def _good_rows(scored: Path):
    """(prompt_id, pair_key) of every row in scored/ that did not fail (failed rows are retried)."""
    for f in shards(scored):
        t = read_shard(f, ["prompt_id", "pair_key", "error"])
        errors = t.column("error").to_pylist() if "error" in t.column_names else [None] * t.num_rows
        for pid, key, err in zip(t.column("prompt_id").to_pylist(), t.column("pair_key").to_pylist(), errors):
            if err is None:
                yield pid, key


def done_prompts(scored: Path, expected_rows: dict[str, int]) -> set[str]:
    """Prompts whose every image-question is already in `scored/` without an error."""
    seen: dict[str, set] = {}
    for pid, key in _good_rows(scored):
        seen.setdefault(pid, set()).add(key)
    return {pid for pid, keys in seen.items() if len(keys) >= expected_rows.get(pid, 1 << 30)}


# Per candidate, every list the rewards stage adds (each term, `hallucinated`, the combined `reward`): taken
# from the stage's own column list, so a term added there reaches candidates/ without an edit here.
CANDIDATE_TERMS = RewardScorer.ADDS
CANDIDATE_SOURCE = ("pair_key", "prompt_id", "question", "answers", "answer_models", *CANDIDATE_TERMS,
                    "chosen_index", "rejected_index")


def _explode_candidates(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        # Roles by position (the pair builder's choice): a copy of the chosen text elsewhere is no second chosen.
        roles = {r["chosen_index"]: "chosen", r["rejected_index"]: "rejected"}
        for j, answer in enumerate(r["answers"] or []):
            out.append({"pair_key": r["pair_key"], "prompt_id": r["prompt_id"], "question": r["question"],
                        "candidate_index": j, "model": r["answer_models"][j], "answer": answer,
                        **{c: r[c][j] for c in CANDIDATE_TERMS}, "role": roles.get(j, "")})
    return out


def _schemas():
    import pyarrow as pa
    s = pa.string()
    # Every term is a float per candidate; `hallucinated` is the list of objects an answer made up.
    terms = [(c, pa.list_(s) if c == "hallucinated" else pa.float64()) for c in CANDIDATE_TERMS]
    candidates = pa.schema([("pair_key", s), ("prompt_id", s), ("question", s), ("candidate_index", pa.int32()),
                            ("model", s), ("answer", s), *terms, ("role", s)])
    errors = pa.schema([("pair_key", s), ("prompt_id", s), ("stage", s), ("reason", s)])
    return candidates, errors


class _Writer:
    """Parquet files of about `rows` rows each, in a temporary folder renamed into place on close."""

    def __init__(self, final: Path, rows: int):
        self.final, self.rows = final, rows
        self.tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)
        self.buffer, self.count, self.files = [], 0, 0

    def add(self, table) -> None:
        if table.num_rows:
            self.buffer.append(table)
            self.count += table.num_rows
            if sum(t.num_rows for t in self.buffer) >= self.rows:
                self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        if self.buffer:
            pq.write_table(pa.concat_tables(self.buffer, promote_options="permissive"),
                           self.tmp / f"part-{self.files:05d}.parquet")
            self.files += 1
            self.buffer = []

    def close(self) -> int:
        self.flush()
        replace_dir(self.tmp, self.final)
        return self.count


def finalize(out: Path, rows_per_file: int) -> dict:
    """Rebuild pairs/, candidates/ and errors/ from scored/; returns row counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    cand_schema, err_schema = _schemas()
    pairs, cands, errs = (_Writer(out / n, rows_per_file) for n in ("pairs", "candidates", "errors"))
    good_keys = {key for _, key in _good_rows(out / "scored")}
    seen: set[str] = set()
    prompts: set[str] = set()
    n_answers, dropped, duplicates = 0, {}, 0
    for f in shards(out / "scored"):
        t = read_shard(f)
        keys = t.column("pair_key").to_pylist()
        error = t.column("error").to_pylist() if "error" in t.column_names else [None] * t.num_rows
        # First good row of each key wins; a failed row only stands where no retry succeeded.
        keep = [k not in seen and (e is None or k not in good_keys) and not seen.add(k)
                for k, e in zip(keys, error)]
        duplicates += sum(1 for e, kp in zip(error, keep) if e is None and not kp)
        t = t.filter(pa.array(keep, pa.bool_()))
        prompts.update(t.column("prompt_id").to_pylist())
        error = t.column("error") if "error" in t.column_names else pa.nulls(t.num_rows, pa.string())
        bad = t.filter(pc.is_valid(error))
        if bad.num_rows:
            reasons = bad.column("error").to_pylist()
            errs.add(pa.table({"pair_key": bad.column("pair_key"), "prompt_id": bad.column("prompt_id"),
                               "stage": [r.split(":", 1)[0] if not r.startswith("sampling:") else
                                         ":".join(r.split(":", 2)[:2]) for r in reasons],
                               "reason": reasons}, schema=err_schema))
        good = t.filter(pc.is_null(error))
        if not good.num_rows:
            continue
        n_answers += int(pc.sum(pc.list_value_length(good.column("answers"))).as_py() or 0)
        for r in good.column("drop_reason").drop_null().to_pylist():
            dropped[r] = dropped.get(r, 0) + 1
        kept = good.filter(pc.is_null(good.column("drop_reason")))
        pairs.add(kept.select([c for c in PAIR_COLUMNS + LINEAGE_COLUMNS if c in kept.column_names]))
        rows = _explode_candidates(good.select(list(CANDIDATE_SOURCE)).to_pylist())
        cands.add(pa.Table.from_pylist(rows, schema=cand_schema))
    n_pairs, n_errors = pairs.close(), errs.close()
    cands.close()
    return {"prompts": len(prompts), "questions": len(seen), "answers": n_answers, "pairs": n_pairs,
            "dropped": dict(sorted(dropped.items())), "errors": n_errors, "duplicates_skipped": duplicates}
