"""Pairs rows -> TRL's vision preference records: the columns training reads and the rows it cannot use."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from actors.common.errors import InputError

# Columns of the pairs Parquet the training reads (see actors.contract.PAIR_COLUMNS).
TRAIN_COLUMNS = ("pair_id", "image", "question", "chosen", "rejected")



def trl_messages(question: str, chosen: str, rejected: str) -> dict:
    """TRL's conversational vision preference format (one image placeholder before the question)."""
    return {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
    }


def row_problem(row: dict) -> str | None:
    """Why a pairs row cannot be trained on, or None. The image is decoded whole: a header that opens may still
    hide truncated or corrupt data, which would fail a training step instead of being skipped here."""
    import io

    from PIL import Image
    for name in ("question", "chosen", "rejected"):
        v = row.get(name)
        if not isinstance(v, str) or not v.strip():
            return f"empty {name}"
    if row["chosen"].strip() == row["rejected"].strip():
        return "chosen == rejected"
    data = row.get("image")
    if not isinstance(data, (bytes, bytearray)) or not data:
        return "no image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception:   # PIL raises OSError, SyntaxError, ValueError, EOFError... by format and damage
        return "undecodable image"
    return None


def to_trl_records(table_or_rows, drop_invalid: bool = True) -> list[dict]:
    """Pairs rows (a pyarrow Table or a list of dicts) -> TRL records: images [PIL], prompt, chosen, rejected.

    Rows `row_problem` rejects are skipped (or raise ValueError when drop_invalid is False). `pair_id` is kept
    when present; TRL ignores extra keys.
    """
    from actors.common.runtime import open_png
    rows = table_or_rows.to_pylist() if hasattr(table_or_rows, "to_pylist") else list(table_or_rows)
    out = []
    for i, row in enumerate(rows):
        problem = row_problem(row)
        if problem:
            if drop_invalid:
                continue
            raise ValueError(f"row {i} ({row.get('pair_id')}): {problem}")
        rec = {"images": [open_png(row["image"])], **trl_messages(row["question"], row["chosen"], row["rejected"])}
        if "pair_id" in row:
            rec["pair_id"] = row["pair_id"]
        out.append(rec)
    return out




def parquet_files(data_path: str) -> list[str]:
    """The pairs Parquet files of a folder (or one file), local or on object storage, each checked for the columns
    training reads: absolute local paths, or URIs. The workers read them straight from where they are."""
    from cluster.storage import Location, is_uri, read_schema
    where = Location(data_path if is_uri(data_path) else str(Path(data_path).resolve()))
    try:
        files = [where] if where.is_file() else where.glob("*.parquet") if where.is_dir() else []
    except OSError as e:   # an object store that refuses (no bucket, no credentials)
        raise InputError(f"cannot list the pairs: {e}", file=str(where)) from None
    if not files:
        raise InputError("no *.parquet pairs files found (run `synthalign generate` first)", file=str(where))
    for f in files:
        try:
            names = read_schema(f).names
        except (OSError, ValueError) as e:   # pyarrow's ArrowInvalid is a ValueError
            raise InputError(f"cannot read as Parquet: {e}", file=str(f)) from None
        missing = [c for c in TRAIN_COLUMNS if c not in names]
        if missing:
            raise InputError(f"not a pairs file: missing column(s) {missing}", file=str(f))
    return [str(f) for f in files]


@contextmanager
def open_parquet(f: str):
    """A pairs file (a local path or a URI) for reading by row batches: an object is read by ranges, never whole."""
    import pyarrow.parquet as pq

    from cluster.storage import Location, is_uri
    if not is_uri(f):
        with pq.ParquetFile(f) as pf:
            yield pf
        return
    loc = Location(f)
    with loc.fs.open_input_file(loc.path) as source:
        yield pq.ParquetFile(source)


PROBLEM_FIELDS = {"empty question": "question", "empty chosen": "chosen", "empty rejected": "rejected",
                  "chosen == rejected": "rejected", "no image": "image", "undecodable image": "image"}
ALL_ROWS, SAMPLE_ROWS = 512, 256   # up to ALL_ROWS rows are all checked before Ray starts, else a sample


def check_pairs(data_path: str, seed: int = 0) -> list[str]:
    """`parquet_files`, then rows checked as the workers will check them (`row_problem`) before Ray starts: all of
    them up to ALL_ROWS, else a seeded sample of SAMPLE_ROWS. When none is usable (garbage images, say), InputError
    naming the first one's file, row (0-based) and field; some bad rows pass: the workers skip and count them."""
    import bisect
    import random

    files = parquet_files(data_path)
    sizes = []
    for f in files:
        with open_parquet(f) as pf:
            sizes.append([pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
    total = sum(map(sum, sizes))
    if not total:
        raise InputError("the pairs files hold no rows", file=str(data_path))
    picks = range(total) if total <= ALL_ROWS else sorted(random.Random(seed).sample(range(total), SAMPLE_ROWS))
    groups, at = [], 0   # (file, row group, its first row, its file's first row), rows counted over all files
    for i, counts in enumerate(sizes):
        file_at = at
        for g, n in enumerate(counts):
            groups.append((i, g, at, file_at))
            at += n
    starts = [first for _, _, first, _ in groups]
    by_group: dict[tuple[int, int], list[tuple[int, int]]] = {}   # -> [(row in the group, row in the file)]
    for pick in picks:
        i, g, first, file_first = groups[bisect.bisect_right(starts, pick) - 1]
        by_group.setdefault((i, g), []).append((pick - first, pick - file_first))
    reasons: dict[str, int] = {}
    first_bad = None
    for (i, g), rows in by_group.items():
        try:
            with open_parquet(files[i]) as pf:
                table = pf.read_row_group(g, columns=list(TRAIN_COLUMNS)).take([r for r, _ in rows])
        except (OSError, ValueError) as e:   # data pages a valid footer points at may still be broken
            raise InputError(f"cannot read as Parquet: {e}", file=files[i]) from None
        for row, (_, in_file) in zip(table.to_pylist(), rows):
            problem = row_problem(row)
            if problem is None:
                return files
            reasons[problem] = reasons.get(problem, 0) + 1
            first_bad = first_bad or (files[i], in_file, row, problem)
    f, r, row, problem = first_bad
    what = ", ".join(f"{n} {p}" for p, n in sorted(reasons.items()))
    raise InputError(f"{problem} (pair_id {row.get('pair_id')!r}); none of the {len(picks)} rows checked of "
                     f"{total} can be trained on ({what})", file=f, row=r, field=PROBLEM_FIELDS[problem])


def trl_features(extra: dict | None = None):
    import datasets
    msg = [{"role": datasets.Value("string"),
            "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]
    return datasets.Features({"images": datasets.List(datasets.Image()), "prompt": msg, "chosen": msg,
                              "rejected": msg, **(extra or {})})


def hf_dataset(rows: list[dict]):
    """TRL records (images as {bytes, path}, decoded lazily by `datasets`) as an in-memory `datasets.Dataset`."""
    import datasets
    return datasets.Dataset.from_list(rows, features=trl_features())


def token_length(row: dict, processor) -> int:
    """Tokens of prompt (image tokens expanded) + the longer answer, as DPOTrainer's collator builds them."""
    from actors.common.runtime import open_png
    msgs = trl_messages(row["question"], row["chosen"], row["rejected"])
    prompt = processor.apply_chat_template(msgs["prompt"], add_generation_prompt=True, tokenize=False)
    n_prompt = processor(images=[open_png(row["image"])], text=[prompt], add_special_tokens=False)["input_ids"]
    answers = [processor.apply_chat_template(msgs["prompt"] + msgs[k], tokenize=False)[len(prompt):]
               for k in ("chosen", "rejected")]
    n_answer = max(len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return len(n_prompt[0]) + n_answer


BATCH_ROWS = 64   # rows in memory at a time while the records are built
RECORDS, ORDER = "records.arrow", "order.arrow"   # the one copy of the pairs, and its pair_id order


def _convert(batch: dict, max_length: int | None, processor, dropped: dict) -> tuple[dict, list[str]]:
    """One Parquet batch -> the TRL records of its usable rows (images stay PNG bytes) and their pair_ids;
    the others are counted in `dropped` by reason."""
    out, ids = {"images": [], "prompt": [], "chosen": [], "rejected": []}, []
    for i in range(len(batch["pair_id"])):
        row = {k: batch[k][i] for k in TRAIN_COLUMNS}
        problem = row_problem(row)
        if problem is None and max_length is not None and token_length(row, processor) > max_length:
            problem = "longer than max_length"
        if problem is not None:
            dropped[problem] = dropped.get(problem, 0) + 1
            continue
        msgs = trl_messages(row["question"], row["chosen"], row["rejected"])
        out["images"].append([{"bytes": row["image"], "path": None}])
        for k in ("prompt", "chosen", "rejected"):
            out[k].append(msgs[k])
        ids.append(row["pair_id"])
    return out, ids


def build_trl_dataset(files: list[str], folder: Path, max_length: int | None = None, processor=None) -> dict:
    """The pairs as TRL records in ONE Arrow file, folder/records/records.arrow, written in a single pass over
    the Parquet files BATCH_ROWS rows at a time (unusable rows, or rows longer than max_length tokens, are
    dropped while writing and counted in folder/dropped.json), plus folder/records/order.arrow: the rows'
    positions sorted by pair_id (a seed then fixes the order, and resume can skip what was seen). Sorting
    moves only the ids, never the images; no other copy of the pairs is written. Returns the drop counts."""
    import json

    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    from actors.common.files import atomic_dir
    folder.mkdir(parents=True, exist_ok=True)
    dropped: dict[str, int] = {}
    ids = []   # pair_ids of the written rows, as Arrow chunks (tens of bytes a row)
    with atomic_dir(folder / "records") as tmp:
        writer = ArrowWriter(features=trl_features(), path=str(tmp / RECORDS), writer_batch_size=BATCH_ROWS)
        for f in files:
            with open_parquet(f) as pf:
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(TRAIN_COLUMNS)):
                    out, kept = _convert(batch.to_pydict(), max_length, processor, dropped)
                    if kept:
                        writer.write_batch(out)
                        ids.append(pa.array(kept, pa.string()))
        writer.finalize()
        # datasets' own indices-mapping file (a uint64 "indices" column): Dataset.from_file maps it.
        order = pc.sort_indices(pa.chunked_array(ids, pa.string())).cast(pa.uint64())
        with ArrowWriter(features=Features({"indices": Value("uint64")}), path=str(tmp / ORDER)) as w:
            w.write_table(pa.table({"indices": order}))
            w.finalize()
    (folder / "dropped.json").write_text(json.dumps(dict(sorted(dropped.items()))))
    return dropped


def load_records(folder: Path):
    """The records build_trl_dataset wrote, memory-mapped (data and order), in pair_id order."""
    import datasets
    return datasets.Dataset.from_file(str(folder / "records" / RECORDS),
                                      indices_filename=str(folder / "records" / ORDER))
