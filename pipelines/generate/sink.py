"""The Ray Data sink of `scored/`: one Parquet shard per write call, complete or absent (see outputs.py).

A module of its own so that `prepare`, which must fail on bad input before Ray starts, does not import Ray Data
(about 1 CPU-s with pandas): the CLI imports it while Ray starts (pipelines/cli, `_ray`)."""
from __future__ import annotations

import os
import time
import uuid

from ray.data import Datasink

from actors.common.files import atomic_file


class AtomicParquetSink(Datasink):
    """Ray Data sink: one Parquet shard per write call, written to a dot-file and renamed into place."""

    def __init__(self, path: str, rows_per_shard: int):
        self.path, self.rows_per_shard = path, rows_per_shard

    @property
    def min_rows_per_write(self):
        return self.rows_per_shard

    def on_write_start(self, schema=None) -> None:
        os.makedirs(self.path, exist_ok=True)

    def write(self, blocks, ctx):
        import pyarrow as pa
        import pyarrow.parquet as pq
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables, promote_options="permissive")
        # Named by write time, so a resume's shards sort after the ones already folded into the views.
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        with atomic_file(os.path.join(self.path, name)) as tmp:
            pq.write_table(table, tmp)
        return table.num_rows
