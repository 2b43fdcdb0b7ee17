"""Data for the training tests: a tiny LLaVA and a learnable pairs Parquet in the `generate` output schema.

Each image is a solid colour; the question asks for it; `chosen` names the colour and `rejected` names another.
Every colour is chosen as often as it is rejected, so the only way to lower the DPO loss is to look at the image.
"""
from __future__ import annotations

from pathlib import Path

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}
QUESTION = "What color is the image? Answer using a single word."


def make_pairs_parquet(out_dir: str | Path, n: int = 64, seed: int = 0, files: int = 2, bad_rows: int = 0) -> Path:
    """Write `n` good pairs plus `bad_rows` untrainable ones (alternately chosen == rejected and an empty
    question) as `files` Parquet files under out_dir; returns the folder."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from actors.common.runtime import png_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    images = {c: png_bytes(Image.new("RGB", (32, 32), COLOURS[c])) for c in names}
    rows = []
    for i in range(n):
        colour = names[i % len(names)]
        wrong = names[(i + 1 + rng.randrange(len(names) - 1)) % len(names)]
        rows.append({
            "pair_id": f"p{i:04d}", "prompt_id": f"q{i // 2:04d}", "image": images[colour],
            "image_prompt": f"a plain {colour} square", "question": QUESTION,
            "chosen": colour, "rejected": wrong, "chosen_reward": 1.0, "rejected_reward": 0.0, "margin": 1.0,
            "chosen_model": "tiny-a", "rejected_model": "tiny-b", "seed": i, "guidance_scale": 7.5,
            "image_score": 0.9, "gt_objects": [colour],
        })
    for j in range(bad_rows):
        bad = dict(rows[j], pair_id=f"bad{j:03d}")
        if j % 2 == 0:
            bad["rejected"] = bad["chosen"]
        else:
            bad["question"] = ""
        rows.append(bad)
    n = len(rows)
    schema = pa.schema([
        ("pair_id", pa.string()), ("prompt_id", pa.string()), ("image", pa.binary()),
        ("image_prompt", pa.string()), ("question", pa.string()), ("chosen", pa.string()),
        ("rejected", pa.string()), ("chosen_reward", pa.float64()), ("rejected_reward", pa.float64()),
        ("margin", pa.float64()), ("chosen_model", pa.string()), ("rejected_model", pa.string()),
        ("seed", pa.int64()), ("guidance_scale", pa.float64()), ("image_score", pa.float64()),
        ("gt_objects", pa.list_(pa.string())),
    ])
    per = (n + files - 1) // files
    for f in range(files):
        part = rows[f * per:(f + 1) * per]
        if part:
            pq.write_table(pa.Table.from_pylist(part, schema=schema), out / f"part-{f:03d}.parquet")
    return out


def make_tiny_llava(out_dir: str | Path) -> Path:
    from pipelines.models.tiny import make_tiny
    return make_tiny(out_dir, names=["llava"])["llava"]
