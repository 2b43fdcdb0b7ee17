"""User-facing errors: the CLI prints them as one line and exits 2 (no traceback unless --debug)."""
from __future__ import annotations


class InputError(Exception):
    """Bad input from the user: a file, a row in it, a field in that row."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.file, self.row, self.field = file, row, field
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
