"""Read a run's pairs and write them in other formats (the paper's LLaVA JSON)."""
from __future__ import annotations

import json

from actors.common.errors import InputError
from actors.contract import PAIR_COLUMNS
from cluster.storage import Location
from pipelines.layout import RunLayout


def pairs_dataset(path, columns=PAIR_COLUMNS):
    """A pyarrow dataset over a pairs folder (a run folder is accepted too; either may be a URI), checked for
    columns."""
    import pyarrow.dataset as pads
    path = Location(path)
    if RunLayout(path).pairs.glob("*.parquet"):
        path = RunLayout(path).pairs
    files = path.glob("*.parquet")
    if not files:
        raise InputError("no pairs Parquet files found (run `synthalign generate` first)", file=str(path))
    ds = pads.dataset([f.path for f in files], format="parquet", filesystem=path.fs)
    missing = [c for c in columns if c not in ds.schema.names]
    if missing:
        raise InputError(f"pairs dataset lacks column(s) {missing}", file=str(files[0]), field=missing[0])
    return ds


def export_llava_json(run, out=None) -> Location:
    """LLaVA JSON as the paper's code reads it: id, image, conversations, rejected_conversations."""
    ds = pairs_dataset(run, ("pair_id", "image", "question", "chosen", "rejected"))
    out = Location(out) if out else RunLayout(run).export_llava
    (out / "images").mkdir()
    records = []
    for batch in ds.to_batches(columns=["pair_id", "image", "question", "chosen", "rejected"], batch_size=256):
        for r in batch.to_pylist():
            name = f"images/{r['pair_id']}.png"
            (out / name).write_bytes(r["image"])
            human = {"from": "human", "value": "<image>\n" + r["question"]}
            records.append({"id": r["pair_id"], "image": name,
                            "conversations": [human, {"from": "gpt", "value": r["chosen"]}],
                            "rejected_conversations": [human, {"from": "gpt", "value": r["rejected"]}]})
    return (out / "pairs.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
