"""The Ray Data sink of `scored/`: one Parquet shard per write call, complete or absent (see outputs.py).

A module of its own so that `prepare`, which must fail on bad input before Ray starts, does not import Ray Data
(about 1 CPU-s with pandas): the CLI imports it while Ray starts (pipelines/cli, `_ray`)."""
from __future__ import annotations

import time
import uuid

from ray.data import Datasink

from cluster.storage import Location, write_table


class AtomicParquetSink(Datasink):
    """Ray Data sink: one Parquet shard per write call, whole or absent (cluster.storage.write_table), into a
    local folder or an object-storage URI: the write tasks run on any node."""

    def __init__(self, path: str, rows_per_shard: int):
        self.path, self.rows_per_shard = str(path), rows_per_shard

    @property
    def min_rows_per_write(self):
        return self.rows_per_shard

    def on_write_start(self, schema=None) -> None:
        Location(self.path).mkdir()

    def write(self, blocks, ctx):
        import pyarrow as pa
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables, promote_options="permissive")
        # Named by write time, so a resume's shards sort after the ones already folded into the views.
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        write_table(table, Location(self.path) / name)
        return table.num_rows
