"""Files a reader never sees half-written (write beside, then rename into place), a user's text files read
as UTF-8 or refused in one line, and path-or-hub-id checks."""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from actors.common.errors import InputError


def read_user_text(path: str | Path, what: str = "file", *, rows: bool = True) -> str:
    """A user's text file as UTF-8 (a leading byte-order mark dropped). Unreadable -> InputError "cannot read
    {what}"; undecodable -> InputError naming the file and the line of the first bad byte: as its `row` when the
    file's rows are its lines, else (rows=False: a JSON document, whose rows are items) as "line N" in the text."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror or e}", file=str(path)) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # e.object is what the codec saw (the bytes after a BOM), so e.start indexes it, not `data`.
        line = e.object.count(b"\n", 0, e.start) + 1
        bad = f"byte 0x{e.object[e.start]:02x}"
        if rows:
            raise InputError(f"not valid UTF-8 ({bad})", file=str(path), row=line) from None
        raise InputError(f"not valid UTF-8 at line {line} ({bad})", file=str(path)) from None


def read_user_lines(path: str | Path, what: str = "file") -> list[str]:
    """The file's lines, split on "\\n" only ("\\r\\n" too): str.splitlines would also split on U+2028 and other
    characters JSON allows inside strings, and row numbers would drift from the ones decoding errors give."""
    return [text for _, text, _ in iter_user_lines(path, what)]


def iter_user_lines(path: str | Path, what: str = "file", start: int = 0, first_line: int = 1):
    """A user's text file's lines one at a time: (line number, text, byte offset after the line), from byte `start`
    (which begins line `first_line`). Same lines, same errors (a bad byte names its line), O(1) memory."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror or e}", file=str(path)) from None
    with f:
        f.seek(start)
        pos, lineno = start, first_line
        for raw in f:   # binary lines end at b"\n" only, as read_user_lines splits
            end = pos + len(raw)
            if pos == 0 and raw.startswith(b"\xef\xbb\xbf"):   # the byte-order mark utf-8-sig drops
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"not valid UTF-8 (byte 0x{e.object[e.start]:02x})", file=str(path),
                                 row=lineno) from None
            text = text[:-1] if text.endswith("\n") else text
            yield lineno, text[:-1] if text.endswith("\r") else text, end
            pos, lineno = end, lineno + 1


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
