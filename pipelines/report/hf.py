"""`synthalign export RUN --format hf`: a run's pairs as a Hugging Face dataset folder.

    README.md                         the dataset card (pipelines.report.card)
    data/train-00000-of-00001.parquet TRL's vision preference columns (images, prompt, chosen, rejected) + lineage
    data/test-00000-of-00001.parquet  held-out prompts: every pair of a prompt is on one side

Each shard's schema carries the `datasets` features, so `datasets.load_dataset(folder)` gives `images` as a list of
`Image()` (PNG bytes, decoded to PIL on access), and DPOTrainer takes a split as it is.
"""
from __future__ import annotations

import random
from pathlib import Path

from actors.common.errors import InputError
from cluster.storage import Location, is_uri
from pipelines.folder import RunFolder
from pipelines.layout import RunLayout
from pipelines.report.export import pairs_dataset

SOURCE = ("pair_id", "prompt_id", "image", "image_prompt", "question", "chosen", "rejected", "chosen_reward",
          "rejected_reward", "margin", "chosen_model", "rejected_model", "seed", "guidance_scale", "image_score",
          "gt_objects")
OPTIONAL = ("question_index", "candidate_scores", "candidate_seeds", "candidate_guidance")   # newer runs have them
SHARD_BYTES = 500 * 2 ** 20   # the Hub's default shard size (push_to_hub's max_shard_size)
BATCH_ROWS = 64


def features(optional=()):
    """TRL's vision preference features (the ones training writes, pipelines.train.data) + our lineage columns."""
    from datasets import List, Value

    from pipelines.train.data import trl_features
    s, f64 = Value("string"), Value("float64")
    lineage = {"pair_id": s, "prompt_id": s, "image_prompt": s, "question": s, "chosen_model": s,
               "rejected_model": s, "chosen_reward": f64, "rejected_reward": f64, "margin": f64,
               "seed": Value("int64"), "guidance_scale": f64, "image_score": f64, "gt_objects": List(s)}
    extra = {"question_index": Value("int32"), "candidate_scores": List(f64), "candidate_seeds": List(Value("int64")),
             "candidate_guidance": List(f64)}
    return trl_features({**lineage, **{k: extra[k] for k in optional}})


def split_prompts(prompt_ids, fraction: float, seed: int) -> set[str]:
    """The prompt_ids held out for test: round(fraction * prompts), at least one when there are two or more
    prompts and never all of them; the same ids for the same prompts and seed, whatever their order."""
    ids = sorted(set(prompt_ids))
    if fraction <= 0 or len(ids) < 2:
        return set()
    n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(random.Random(seed).sample(ids, n))


def check_out(out: Path, overwrite: bool) -> None:
    """An empty or absent folder; --overwrite replaces only an earlier export (never, say, a run folder)."""
    if out.is_file():
        raise InputError("is a file, not a folder", file=str(out))
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError("exists and is not empty; pass --overwrite to replace it, or another --out",
                             file=str(out))
        if not ((out / "README.md").is_file() and (out / "data").is_dir()):
            raise InputError("not an earlier export (no README.md and data/): --overwrite replaces only those",
                             file=str(out))


def check_repo(repo: str) -> None:
    """A repo id and a token before anything is written: a push that cannot start fails first."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise InputError(str(e).splitlines()[0], field="--push-to-hub") from None
    if not get_token():
        raise InputError("no Hugging Face token: set HF_TOKEN (or run `hf auth login`)", field="--push-to-hub")


class _Shards:
    """One split's Parquet shards, a new file after SHARD_BYTES; named <split>-0000i-of-0000n at the end."""

    def __init__(self, folder: Path, split: str, schema):
        self.folder, self.split, self.schema = folder, split, schema
        self.files, self.writer, self.size, self.rows, self.bytes = [], None, 0, 0, 0

    def write(self, table) -> None:
        import pyarrow.parquet as pq
        if self.writer is None or self.size >= SHARD_BYTES:
            self.close()
            self.files.append(self.folder / f".{self.split}-{len(self.files):05d}.parquet")
            self.writer, self.size = pq.ParquetWriter(self.files[-1], self.schema), 0
        self.writer.write_table(table)
        self.size += table.nbytes
        self.rows += table.num_rows
        self.bytes += table.nbytes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self) -> list[str]:
        self.close()
        names = [f"{self.split}-{i:05d}-of-{len(self.files):05d}.parquet" for i in range(len(self.files))]
        for f, name in zip(self.files, names):
            f.rename(self.folder / name)
        return names


def _records(batch: dict, columns) -> dict:
    from pipelines.train.data import trl_messages
    n = len(batch["pair_id"])
    out = {"images": [[{"bytes": b, "path": None}] for b in batch["image"]], "prompt": [], "chosen": [],
           "rejected": []}
    for i in range(n):
        msgs = trl_messages(batch["question"][i], batch["chosen"][i], batch["rejected"][i])
        for k in ("prompt", "chosen", "rejected"):
            out[k].append(msgs[k])
    return {**out, **{c: batch[c] for c in columns if c not in out}}


def write_splits(ds, folder: Path, test_ids: set[str], feats) -> dict:
    """Stream the pairs into train/test shards under folder/data; returns rows, prompts, files and the values the
    card summarises (rewards, margins, models) per split."""
    import pyarrow as pa
    schema = feats.arrow_schema
    (folder / "data").mkdir(parents=True)
    shards = {s: _Shards(folder / "data", s, schema) for s in ("train", "test")}
    stats = {"prompts": {"train": set(), "test": set()}, "chosen_reward": [], "rejected_reward": [], "margin": [],
             "chosen_model": [], "rejected_model": []}
    columns = [c for c in ds.schema.names if c in SOURCE + OPTIONAL]
    for batch in ds.to_batches(columns=columns, batch_size=BATCH_ROWS):
        rec = _records(batch.to_pydict(), [c for c in feats if c in columns])
        for key in ("chosen_reward", "rejected_reward", "margin", "chosen_model", "rejected_model"):
            stats[key] += rec[key]
        sides = ["test" if p in test_ids else "train" for p in rec["prompt_id"]]
        for split in ("train", "test"):
            keep = [i for i, s in enumerate(sides) if s == split]
            if keep:
                part = {k: [v[i] for i in keep] for k, v in rec.items()}
                shards[split].write(pa.Table.from_pydict(feats.encode_batch(part), schema=schema))
                stats["prompts"][split].update(part["prompt_id"])
    files = {s: sh.finish() for s, sh in shards.items()}
    return {**stats, "files": {s: f for s, f in files.items() if f},
            "rows": {s: sh.rows for s, sh in shards.items()}, "bytes": {s: sh.bytes for s, sh in shards.items()},
            "prompts": {s: len(p) for s, p in stats["prompts"].items()}}


def export_hf(run, out=None, test_fraction: float = 0.05, seed: int = 0, overwrite: bool = False,
              license: str | None = None) -> Path:
    """Write RUN's pairs as a dataset folder (see the module docstring); nothing is written on bad input, and a
    half-written folder never replaces `out` (it is built beside it and renamed into place)."""
    from actors.common.files import atomic_dir
    from pipelines.report.card import write_card
    if not 0 <= test_fraction < 1:
        raise InputError(f"must be in [0, 1), got {test_fraction}", field="--test-fraction")
    layout = RunLayout(run)
    if not layout.pairs.glob("*.parquet"):
        raise InputError("no pairs/*.parquet here: not a run folder, or run `synthalign generate` first",
                         file=str(layout.root))
    manifest = RunFolder.at(run).manifest()
    if manifest is None:
        raise InputError("no manifest.json: not a run folder (export --format hf needs the run, not its pairs "
                         "folder)", file=str(layout.root))
    if out is None:
        if layout.root.remote:
            raise InputError("a run on object storage needs --out (a local folder)", file=str(layout.root))
        out = layout.export_hf
    if is_uri(out):
        raise InputError("must be a local folder (upload with --push-to-hub)", field="--out")
    out = Path(Location(out).path)
    check_out(out, overwrite)
    ds = pairs_dataset(run, SOURCE)
    prompt_ids = ds.to_table(columns=["prompt_id"]).column("prompt_id").to_pylist()
    if not prompt_ids:
        raise InputError("the pairs files hold no rows", file=str(layout.pairs))
    test_ids = split_prompts(prompt_ids, test_fraction, seed)
    feats = features([c for c in OPTIONAL if c in ds.schema.names])
    with atomic_dir(out) as tmp:
        stats = write_splits(ds, tmp, test_ids, feats)
        write_card(tmp / "README.md", manifest, stats, feats, test_fraction=test_fraction, seed=seed,
                   license=license)
    return out


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Create (or reuse) the dataset repo and upload the folder in one commit; the token comes from HF_TOKEN or
    the login huggingface_hub keeps, and is never printed."""
    from huggingface_hub import HfApi
    api = HfApi()
    url = api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="dataset",
                      commit_message="synthalign export --format hf")
    return str(url)
