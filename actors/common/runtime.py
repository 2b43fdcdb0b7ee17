"""Small things every model stage needs: threads, dtypes, PNG bytes, Arrow list columns."""
from __future__ import annotations

import io


def setup_torch(threads: int, seed: int | None = None):
    """One thread per actor by default: on 2-core machines torch with 2 threads is erratic."""
    import torch
    torch.set_num_threads(max(1, threads))
    if seed is not None:
        torch.manual_seed(seed)
    return torch


def torch_dtype(name: str):
    import torch
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (float32, float16, bfloat16)") from None


def device_for(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    # No metadata: same pixels give the same bytes. Level 1: ~2-4x less CPU than PIL's default 6 for ~10% larger
    # files (64-1024 px, docs/results.md); every candidate image of a run is encoded once.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def open_png(data: bytes):
    from PIL import Image
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def with_columns(table, columns: dict):
    """Return `table` plus (or with replaced) the given columns, each a pyarrow array or python list."""
    import pyarrow as pa
    for name, values in columns.items():
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table


def node_tag(stage: str) -> str:
    """`stage=node_id` for the lineage column `stage_nodes`: where each stage ran this row."""
    try:
        import ray
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # outside Ray (unit tests, plain loops)
        node = "local"
    return f"{stage}={node}"


def add_node_tag(table, stage: str):
    import pyarrow as pa
    tag = node_tag(stage)
    prev = table.column("stage_nodes").to_pylist() if "stage_nodes" in table.column_names else None
    rows = [(prev[i] if prev else []) + [tag] for i in range(table.num_rows)]
    return with_columns(table, {"stage_nodes": pa.array(rows, pa.list_(pa.string()))})


def status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (e.g. VmRSS, VmHWM) in MB; None off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:  # not Linux
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak RSS (MB), mapped pages included: VmHWM belongs to the process's own memory map.
    ru_maxrss would not do for a subprocess: Linux carries it across exec, so a child reports at least the RSS
    its parent had when it forked."""
    import resource
    peak = status_mb("VmHWM")
    return peak if peak is not None else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
