"""Read a run's pairs and write them in other formats (the paper's LLaVA JSON)."""
from __future__ import annotations

import json
from pathlib import Path

from actors.common.errors import InputError
from actors.common.files import atomic_write
from actors.contract import PAIR_COLUMNS


def pairs_dataset(path: str | Path, columns=PAIR_COLUMNS):
    """A pyarrow dataset over a pairs folder (a run folder is accepted too), checked for columns."""
    import pyarrow.dataset as pads
    path = Path(path)
    if (path / "pairs").is_dir():
        path = path / "pairs"
    files = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        raise InputError("no pairs Parquet files found (run `synthalign generate` first)", file=str(path))
    ds = pads.dataset([str(f) for f in files], format="parquet")
    missing = [c for c in columns if c not in ds.schema.names]
    if missing:
        raise InputError(f"pairs dataset lacks column(s) {missing}", file=str(files[0]), field=missing[0])
    return ds


def export_llava_json(run: str | Path, out: str | Path | None = None) -> Path:
    """LLaVA JSON as the paper's code reads it: id, image, conversations, rejected_conversations."""
    ds = pairs_dataset(run, ("pair_id", "image", "question", "chosen", "rejected"))
    out = Path(out) if out else Path(run) / "export" / "llava"
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for batch in ds.to_batches(columns=["pair_id", "image", "question", "chosen", "rejected"], batch_size=256):
        for r in batch.to_pylist():
            name = f"images/{r['pair_id']}.png"
            (out / name).write_bytes(r["image"])
            human = {"from": "human", "value": "<image>\n" + r["question"]}
            records.append({"id": r["pair_id"], "image": name,
                            "conversations": [human, {"from": "gpt", "value": r["chosen"]}],
                            "rejected_conversations": [human, {"from": "gpt", "value": r["rejected"]}]})
    atomic_write(out / "pairs.json", json.dumps(records, indent=1, ensure_ascii=False))
    return out / "pairs.json"
