"""Files a reader never sees half-written (write beside, then rename into place), and path-or-hub-id checks."""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path` (`.NAME.tmp`); on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)  # atomic on POSIX file systems


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
    return Path(path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished folder into place: the old one is renamed aside first, then removed."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | Path):
    """Yield an empty temporary folder beside `final`; on success it becomes `final`, else it is removed."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def looks_local(path: str) -> bool:
    """A local path rather than a hub id: it starts like a path, or it exists."""
    return path.startswith(("/", ".", "~")) or os.path.exists(path)
