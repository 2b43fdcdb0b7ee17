"""Incremental views: `pairs/`, `candidates/`, `errors/` fold in only the `scored/` shards they lack.

State: `.views/state.json` (written whole) lists the folded shards, the next part number per view, the
additive counts and the key index files (`.views/keys-NNNNN.parquet`: pair_key, prompt_id of every good row a
fold kept). A fold writes its new part files under dot-temporary names, commits the state with the moves
still to do (`pending`) and the files they make obsolete, then does them: a write that fails before the commit
(a full disk) removes what the fold wrote; a kill before it leaves only temporary files (removed next time, the
shards are folded again); a kill after it is rolled forward by the next finalize (every step can be done twice).
A reader of `pairs/` sees whole files only. The same steps work on object storage, where a move is a copy and a
delete. The errors view is small (four strings per failed row) and is rewritten whole when it changes, since a
retry that succeeds in a later shard removes its error row.

The rules are the full rebuild's, in fold order (shard names sort by write time, so a resume's shards come
after the folded ones): the first good row of a key wins; a failed row stands only while no good row of its
key is folded, and only the first failed row of a key.
"""
from __future__ import annotations

import json

from cluster.storage import Location, read_table, write_table

VIEWS = ("pairs", "candidates", "errors")
STATE_DIR = ".views"
BUFFER_BYTES = 128 << 20  # a view file is flushed at rows_per_file rows or at this many bytes (images are big)


def _temporary(final: Location) -> Location:
    return final.parent / f".{final.name}.tmp"


class _Parts:
    """New part files of one view, each about `rows` rows, written under dot-temporary names in `folder`."""

    def __init__(self, folder: Location, rows: int, first: int):
        self.folder, self.rows, self.next = folder, rows, first
        self.buffer, self.count, self.written = [], 0, []  # written: (temporary, final) locations

    def add(self, table) -> None:
        if table.num_rows:
            self.buffer.append(table)
            self.count += table.num_rows
            if (sum(t.num_rows for t in self.buffer) >= self.rows
                    or sum(t.nbytes for t in self.buffer) >= BUFFER_BYTES):
                self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        if self.buffer:
            final = self.folder / f"part-{self.next:05d}.parquet"
            tmp = write_table(pa.concat_tables(self.buffer, promote_options="permissive"), _temporary(final))
            self.written.append((tmp, final))
            self.next, self.buffer = self.next + 1, []


def _error_schema():
    import pyarrow as pa
    return pa.schema([(c, pa.string()) for c in ("pair_key", "prompt_id", "stage", "reason")])


def _load_state(out: Location) -> dict | None:
    path = out / STATE_DIR / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def _commit(out: Location, state: dict) -> None:
    (out / STATE_DIR).mkdir()
    (out / STATE_DIR / "state.json").write_text(json.dumps(state, indent=1))


def _roll_forward(out: Location, state: dict) -> None:
    """Do the committed deletes and moves (each idempotent), then drop what no committed state refers to."""
    for rel in state.get("obsolete", []):
        (out / rel).unlink()
    for src, dst in state.get("pending", []):
        src = out / src
        if src.exists():
            src.replace(out / dst)
    if state.get("pending") or state.get("obsolete"):
        state["pending"], state["obsolete"] = [], []
        _commit(out, state)
    _clean_temporaries(out)


def _clean_temporaries(out: Location) -> None:
    for view in VIEWS:
        for d in [*out.glob(f".{view}.tmp-*"), *out.glob(f".{view}.old-*")]:   # an earlier layout's swaps
            d.rmtree()
        for f in (out / view).glob(".*.tmp"):
            f.unlink()


def _files(folder: Location) -> list[Location]:
    return [f for f in folder.glob("*") if not f.name.startswith(".")]


def _usable(out: Location, state: dict | None, shard_names: set[str]) -> bool:
    """A state whose views or folded shards went missing (deleted by hand) is dropped: rebuild from scratch."""
    if state is None or state.get("version") != 1:
        return False
    if not (set(state["folded"]) <= shard_names and all((out / STATE_DIR / k).exists() for k in state["key_files"])):
        return False
    for view in ("pairs", "candidates"):
        names = {f.name for f in _files(out / view)}
        if any(f"part-{i:05d}.parquet" not in names for i in range(state["next_part"][view])):
            return False
    return not state.get("errors_file") or (out / "errors" / "part-00000.parquet").exists()


def folded_key_files(out, shard_names: set[str]) -> tuple[set[str], list[Location]]:
    """The shards the views have folded and the key index files of their good rows (read-only: a resume's
    `done_prompts` reads these instead of those shards); nothing when the state is missing or unusable."""
    out = Location(out)
    state = _load_state(out)
    if not _usable(out, state, shard_names):
        return set(), []
    return set(state["folded"]), [out / STATE_DIR / k for k in state["key_files"]]


def _read_keys(out: Location, state: dict):
    """The folded good keys (a set: each shard's rows are checked against it) and their prompt ids (Arrow
    columns, only counted: no Python string per pair beyond the one the rules need)."""
    keys, prompts = set(), []
    for name in state["key_files"]:
        t = read_table(out / STATE_DIR / name)
        keys.update(t.column("pair_key").to_pylist())
        prompts.append(t.column("prompt_id"))
    return keys, prompts


def _read_errors(out: Location) -> dict:
    """pair_key -> error row, in view order (the first failed row of each unresolved key)."""
    return {r["pair_key"]: r for f in _files(out / "errors") if f.name.endswith(".parquet")
            for r in read_table(f).to_pylist()}


def fold(out, rows_per_file: int, shards: list, fold_rows) -> dict:
    """Fold the shards not yet in the views; `fold_rows(table, good_seen, errors)` splits one shard (see
    outputs.py). Returns the manifest counts of the whole folder."""
    out = Location(out)
    state = _load_state(out)
    if state is not None:
        _roll_forward(out, state)
    else:
        _clean_temporaries(out)
    shards = [Location(f) for f in shards]
    by_name = {f.name: f for f in shards}
    fresh = not _usable(out, state, set(by_name))
    if fresh:
        state = {"version": 1, "folded": [], "next_part": {"pairs": 0, "candidates": 0}, "key_files": [],
                 "counts": {"answers": 0, "pairs": 0, "dropped": {}, "duplicates_skipped": 0}, "pending": []}
        good_seen, prompts, errors = set(), [], {}
    else:
        good_seen, prompts = _read_keys(out, state)
        errors = _read_errors(out)
    folded = set(state["folded"])
    new = [f for f in shards if f.name not in folded]
    if not new and not fresh:
        return _counts(state, good_seen, prompts, errors)
    parts = {v: _Parts(out / v, rows_per_file, state["next_part"][v]) for v in ("pairs", "candidates")}
    made: list[Location] = []   # what this fold wrote before its commit: removed if it never commits
    try:
        _fold_new(out, state, new, fresh, parts, made, good_seen, prompts, errors, fold_rows)
    except Exception:   # e.g. a full disk: the old views and state stand, no temporary file stays
        for f in [*made, *(tmp for p in parts.values() for tmp, _ in p.written)]:
            f.unlink()
        raise
    _roll_forward(out, state)
    return _counts(state, good_seen, prompts, errors)


def _fold_new(out, state, new, fresh, parts, made, good_seen, prompts, errors, fold_rows) -> None:
    """Write the new files of `fold` under temporary names (and the key file), then commit the state."""
    import pyarrow as pa
    errors_before = list(errors)
    new_keys, new_pids, counts = [], [], state["counts"]
    for f in new:
        split = fold_rows(read_table(f), good_seen, errors)
        new_keys.append(split["keys"])
        new_pids.append(split["prompt_ids"])
        parts["pairs"].add(split["pairs"])
        parts["candidates"].add(split["candidates"])
        counts["answers"] += split["answers"]
        counts["duplicates_skipped"] += split["duplicates"]
        for r, n in split["dropped"].items():
            counts["dropped"][r] = counts["dropped"].get(r, 0) + n
    pending, replaced = [], {}   # replaced: view -> its files as they are now, when the fold rewrites it whole
    for v, p in parts.items():
        p.flush()
        counts["pairs"] += p.count if v == "pairs" else 0
        state["next_part"][v] = p.next
        pending += p.written
        (out / v).mkdir()
        if fresh:  # an earlier config's or layout's files give way to the new ones
            replaced[v] = _files(out / v)
    if fresh or list(errors) != errors_before:
        replaced["errors"] = _files(out / "errors")
        (out / "errors").mkdir()
        if errors:
            final = out / "errors" / "part-00000.parquet"
            rows = pa.Table.from_pylist(list(errors.values()), schema=_error_schema())
            made.append(_temporary(final))
            pending.append((write_table(rows, _temporary(final)), final))
        state["errors_file"] = bool(errors)
    if sum(len(k) for k in new_keys):
        name = f"keys-{len(state['key_files']):05d}.parquet"
        (out / STATE_DIR).mkdir()
        keys = pa.table({"pair_key": _strings(new_keys), "prompt_id": _strings(new_pids)})
        made.append(out / STATE_DIR / name)
        write_table(keys, out / STATE_DIR / name)
        state["key_files"].append(name)
        prompts.append(keys.column("prompt_id"))
    state["folded"] += [f.name for f in new]
    targets = {b for _, b in pending}
    state["pending"] = [[a.relative_to(out), b.relative_to(out)] for a, b in pending]
    # Never a file a move will land on: deleting one again after its move (a roll forward done twice) would lose it.
    state["obsolete"] = [f.relative_to(out) for files in replaced.values() for f in files if f not in targets]
    _commit(out, state)  # the commit point: before it the old views stand, after it the new ones


def _strings(columns: list):
    """Arrow string columns (arrays or chunked arrays, any string type) as one chunked array of `string`."""
    import pyarrow as pa
    chunks = [c for col in columns for c in (col.chunks if isinstance(col, pa.ChunkedArray) else [col])]
    return pa.chunked_array([c.cast(pa.string()) for c in chunks], pa.string())


def _counts(state: dict, good_seen: set, prompts: list, errors: dict) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    c = state["counts"]
    pids = _strings([*prompts, pa.array([e["prompt_id"] for e in errors.values()], pa.string())])
    return {"prompts": pc.count_distinct(pids).as_py(),
            "questions": len(good_seen) + len(errors), "answers": c["answers"], "pairs": c["pairs"],
            "dropped": dict(sorted(c["dropped"].items())), "errors": len(errors),
            "duplicates_skipped": c["duplicates_skipped"]}
