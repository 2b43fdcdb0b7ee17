"""User-facing errors: the CLI prints them as one line and exits 2 (no traceback unless --debug)."""
from __future__ import annotations

from typing import NamedTuple


class ContractError(Exception):
    """A chain whose stages do not fit: one needs a column no earlier stage adds (actors/contract.py)."""


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


class Problem(NamedTuple):
    """One thing wrong with a config, located by its dotted key (`samplers[1].n`): data, not a string that
    callers split apart again."""
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message

    def error(self, file: str | None = None, more: int = 0) -> InputError:
        extra = f" (and {more} more problem(s))" if more else ""
        return InputError(self.message + extra, file=file, field=self.key or None)


def raise_first(problems: list[Problem], file: str | None = None) -> None:
    """Raise the first problem as an InputError (saying how many more there are); nothing when there is none."""
    if problems:
        raise problems[0].error(file, len(problems) - 1)


def failure_reason(e: BaseException) -> str:
    """What a manifest or training summary records about the error that ended a run: its type and first line."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
