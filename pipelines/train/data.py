"""Pairs rows -> TRL's vision preference records: the columns training reads and the rows it cannot use."""
from __future__ import annotations

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
    """Why a pairs row cannot be trained on, or None. Opens the image header only (no full decode)."""
    import io

    from PIL import Image, UnidentifiedImageError
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
        Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
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
    """The pairs Parquet files of a folder (or one file), each checked for the columns training reads."""
    import pyarrow.parquet as pq
    if "://" in data_path:          # remote storage: let Ray Data list and read it
        return [data_path]
    p = Path(data_path).resolve()
    files = [str(p)] if p.is_file() else sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else []
    if not files:
        raise InputError("no *.parquet pairs files found (run `synthalign generate` first)", file=str(p))
    for f in files:
        missing = [c for c in TRAIN_COLUMNS if c not in pq.read_schema(f).names]
        if missing:
            raise InputError(f"not a pairs file: missing column(s) {missing}", file=f)
    return files


def hf_dataset(rows: list[dict]):
    """TRL records (images as {bytes, path}, decoded lazily by `datasets`) as a `datasets.Dataset`."""
    import datasets
    msg = [{"role": datasets.Value("string"),
            "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]
    features = datasets.Features({"images": datasets.List(datasets.Image()), "prompt": msg, "chosen": msg,
                                  "rejected": msg})
    return datasets.Dataset.from_list(rows, features=features)
