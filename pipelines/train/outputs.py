"""Where the files of a training run live: what the run keeps goes to its output location (a local folder or
object storage), what a node only needs while it trains stays in a scratch folder of that node.

No node assumes it shares a disk with another: each node builds the TRL records in its own scratch folder, and
only rank 0 writes the run's results. On a local output_dir they are written in place, as always; on object
storage they are made in rank 0's scratch folder and uploaded whole (an object appears once its upload is done).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from cluster.storage import Location

METRICS_FLUSH_S = 30.0   # on object storage metrics.jsonl is rewritten whole: at checkpoints, at the end, this often


def node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()


def node_scratch(run_id: str) -> Path:
    """This node's scratch folder of one run_train call, under TMPDIR: the same for every rank on the node, keyed
    by node id so that two Ray nodes on one machine stay apart."""
    return Path(tempfile.gettempdir()) / f"synthalign-train-{run_id}-{node_id()[:12]}"


def is_node_builder(rank: int, nodes: list[str]) -> bool:
    """The lowest rank of each node builds its records. `nodes`: every rank's node id, in rank order. (Not Ray
    Train's local rank 0: local ranks are counted per IP address, and two Ray nodes may share one.)"""
    return nodes.index(nodes[rank]) == rank


def node_records(files: list[str], cfg, processor, run_id: str, builder: bool):
    """The TRL records on this node: its builder makes them from the pairs (read from wherever they are), the
    other ranks wait at the barrier; then each rank memory-maps them. No process holds the pairs in memory.
    Returns the records, the dropped rows by reason and the records' bytes on disk."""
    import torch.distributed as dist

    from pipelines.train.data import build_trl_dataset, load_records
    folder = node_scratch(run_id) / "data"
    if builder:
        build_trl_dataset(files, folder, cfg.max_length, processor)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())   # for the record: one copy of the pairs
    return load_records(folder), json.loads((folder / "dropped.json").read_text()), size


def remove_node_scratch(run_id: str, builder: bool) -> None:
    """The builder removes its node's records (mapped files stay readable until unmapped)."""
    if builder:
        shutil.rmtree(node_scratch(run_id), ignore_errors=True)


class RunOutputs:
    """Rank 0's results: `local(key)` is where to write one on this node, `publish(key)` puts it in place."""

    def __init__(self, paths: dict[str, str], staging: Path):
        self.loc = {k: Location(v) for k, v in paths.items()}
        self.remote = self.loc["root"].remote
        self.staging = staging

    def local(self, key: str) -> Path:
        loc = self.loc[key]
        return loc.local if loc.local is not None else self.staging / "out" / key

    def publish(self, key: str) -> None:
        """Upload the staged file or folder (file by file, each whole); nothing to do for a local run."""
        src = self.local(key)
        if not self.remote or not src.exists():
            return
        import pyarrow.fs as pafs
        dest = self.loc[key]
        pafs.copy_files(str(src), dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)

    def write_json(self, key: str, data: dict) -> None:
        self.loc[key].parent.mkdir()
        self.loc[key].write_text(json.dumps(data, indent=2))


class MetricsLog:
    """metrics.jsonl, one line per logged step. A local file is appended to; an object is rewritten whole from the
    lines held here (a few hundred bytes a step), at `flush` and at most every METRICS_FLUSH_S on `add`."""

    def __init__(self, loc: Location):
        self.loc, self.lines, self.flushed = loc, [], time.monotonic()

    def start(self, start_step: int) -> None:
        """Keep the lines up to the step training resumes from (a failed attempt may have logged past it)."""
        keep = []
        if start_step > 0 and self.loc.exists():
            keep = [ln for ln in self.loc.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start_step]
        self.lines = [ln + "\n" for ln in keep]
        self.loc.parent.mkdir()
        self.loc.write_text("".join(self.lines))

    def add(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if not self.loc.remote:
            self.loc.append_text(line)
            return
        self.lines.append(line)
        if time.monotonic() - self.flushed > METRICS_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.loc.remote:
            self.loc.write_text("".join(self.lines))
            self.flushed = time.monotonic()
