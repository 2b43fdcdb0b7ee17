"""What a generate run leaves on disk, and how it survives being killed.

`scored/` is the stream's durable log: every shard is written under a temporary name and renamed into
place, so a shard is complete or absent. A rerun skips the prompts whose rows are all there; the views
`pairs/`, `candidates/` and `errors/` fold in the shards they lack (views.py), keeping the first good row of
each `pair_key`, so a prompt redone after a crash is never counted twice.
"""
from __future__ import annotations

from actors.contract import PAIR_COLUMNS
from actors.rewards import RewardScorer
from cluster.storage import Location, read_table

LINEAGE_COLUMNS = ("question_index", "candidate_scores", "candidate_seeds", "candidate_guidance", "stage_nodes")


def shards(folder) -> list[Location]:
    return Location(folder).glob("shard-*.parquet")


def read_shard(path, columns=None):
    return read_table(Location(path), columns)


def clean_partial(scored) -> int:
    """Remove temporary files a killed run left behind; returns how many."""
    leftovers = Location(scored).glob(".shard-*.tmp")
    for f in leftovers:
        f.unlink()
    return len(leftovers)


def done_prompts(scored, expected_rows: dict[str, int]) -> set[str]:
    """Prompts whose every image-question is already in `scored/` without an error."""
    return {pid for pid, n in question_counts(scored).items() if n >= expected_rows.get(pid, 1 << 30)}


def question_counts(scored) -> dict[str, int]:
    """Per prompt in `scored/`, its distinct image-questions written without an error. The shards the views have
    folded are known by the key index (`.views/keys-*.parquet`: the first good row of each key); the others are
    read for three columns. Pairs are counted in Arrow (tens of bytes a row), never as Python sets."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.generate.views import folded_key_files
    scored = Location(scored)
    written = shards(scored)
    folded, key_files = folded_key_files(scored.parent, {f.name for f in written})
    parts = [read_shard(f, ["prompt_id", "pair_key"]) for f in key_files]
    for f in written:
        if f.name not in folded:
            t = read_shard(f, ["prompt_id", "pair_key", "error"])
            if "error" in t.column_names:
                t = t.filter(pc.is_null(t.column("error")))
            parts.append(t.select(["prompt_id", "pair_key"]))
    if not parts:
        return {}
    pairs = pa.concat_tables([t.cast(pa.schema([("prompt_id", pa.string()), ("pair_key", pa.string())]))
                              for t in parts])
    per_prompt = pairs.group_by("prompt_id").aggregate([("pair_key", "count_distinct")])
    return dict(zip(per_prompt.column("prompt_id").to_pylist(),
                    per_prompt.column("pair_key_count_distinct").to_pylist()))


def written_pairs(scored) -> tuple[int, int]:
    """The shards in `scored/` and the pairs they hold (distinct keys of rows without an error or a drop reason):
    what a run that stopped early leaves for the next one."""
    import pyarrow as pa
    import pyarrow.compute as pc
    files, keys = shards(scored), []
    for f in files:
        t = read_shard(f, ["pair_key", "error", "drop_reason"])
        for c in ("error", "drop_reason"):
            if c in t.column_names:
                t = t.filter(pc.is_null(t.column(c)))
        keys.append(t.column("pair_key").cast(pa.string()))
    n = pc.count_distinct(pa.chunked_array([c for k in keys for c in k.chunks], pa.string())).as_py() if keys else 0
    return len(files), n


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
    return pa.schema([("pair_key", s), ("prompt_id", s), ("question", s), ("candidate_index", pa.int32()),
                      ("model", s), ("answer", s), *terms, ("role", s)])


def _stage(reason: str) -> str:
    return reason.split(":", 1)[0] if not reason.startswith("sampling:") else ":".join(reason.split(":", 2)[:2])


def fold_rows(t, good_seen: set, errors: dict) -> dict:
    """One scored shard against what is folded so far: the first good row of each key is kept (`good_seen`
    grows; an error row of that key is resolved, i.e. leaves `errors`); a failed row enters `errors` unless
    its key already has a good row or an earlier failed row. Returns the rows for pairs/ and candidates/."""
    import pyarrow as pa
    import pyarrow.compute as pc
    keys, pids = t.column("pair_key").to_pylist(), t.column("prompt_id").to_pylist()
    error = t.column("error").to_pylist() if "error" in t.column_names else [None] * t.num_rows
    keep, duplicates = [], 0
    for i, (k, e) in enumerate(zip(keys, error)):
        if e is not None:
            if k not in good_seen and k not in errors:
                errors[k] = {"pair_key": k, "prompt_id": pids[i], "stage": _stage(e), "reason": e}
            keep.append(False)
        elif k in good_seen:
            duplicates += 1
            keep.append(False)
        else:
            good_seen.add(k)
            errors.pop(k, None)
            keep.append(True)
    good = t.filter(pa.array(keep, pa.bool_()))
    dropped: dict[str, int] = {}
    if good.num_rows:
        for r in good.column("drop_reason").drop_null().to_pylist():
            dropped[r] = dropped.get(r, 0) + 1
        kept = good.filter(pc.is_null(good.column("drop_reason")))
        answers = int(pc.sum(pc.list_value_length(good.column("answers"))).as_py() or 0)
        rows = _explode_candidates(good.select(list(CANDIDATE_SOURCE)).to_pylist())
    else:
        kept, answers, rows = good, 0, []
    return {"keys": good.column("pair_key"), "prompt_ids": good.column("prompt_id"),
            "pairs": kept.select([c for c in PAIR_COLUMNS + LINEAGE_COLUMNS if c in kept.column_names]),
            "candidates": pa.Table.from_pylist(rows, schema=_schemas()), "answers": answers,
            "duplicates": duplicates, "dropped": dropped}


def finalize(out, rows_per_file: int) -> dict:
    """Bring pairs/, candidates/ and errors/ up to date with scored/, folding in only the shards they lack
    (views.py); returns the row counts of the whole folder."""
    from pipelines.generate.views import fold
    out = Location(out)
    return fold(out, rows_per_file, shards(out / "scored"), fold_rows)
