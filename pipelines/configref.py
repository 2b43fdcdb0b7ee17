"""The config reference (docs/config.md), generated from the config dataclasses: every key with its type,
default and description. A field's description is the comment on it in its dataclass (the lines above the
field and the one after it), so code and reference cannot drift: tests/pipelines/test_configref.py fails when
docs/config.md is not what this module writes.

    python -m pipelines.configref            # print
    python -m pipelines.configref --write    # rewrite docs/config.md
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"
HEADER = """# Config reference

Every key of a run config, generated from the config classes by `python -m pipelines.configref --write` (a test
fails when this file is stale). Keys are dotted as `--set` takes them; `samplers[]` is each entry of the list,
`pools.<key>` each pool (`images`, `selection`, `sampling`, `sampling:<name>`, `rewards`). How the sections fit
together: [configs.md](configs.md).
"""


def field_comments(cls) -> dict[str, str]:
    """{field name: its comment}: the comment lines right above a field plus the comment at the end of its line."""
    lines = inspect.getsource(cls).splitlines()[1:]
    out, block = {}, []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            block.append(text[1:].strip())
            continue
        if text.startswith(("def ", "@")):
            break
        head, _, inline = line.partition("  # ")
        name = head.strip().split(":", 1)[0] if ":" in head and not head.strip().startswith('"') else ""
        if name.isidentifier():
            out[name] = " ".join(block + ([inline.strip()] if inline.strip() else []))
        block = []
    return out


def _type_text(tp) -> str:
    text = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
    return text or str(tp).replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = _default(f)
    if dataclasses.is_dataclass(value):
        return ""
    return "`null`" if value is None else f"`{value!r}`".replace("|", "\\|")


def _section_class(tp):
    """The dataclass a field holds (itself, optional, a list of it or a dict of it), else None."""
    for arg in (tp, *typing.get_args(tp), *(a for t in typing.get_args(tp) for a in typing.get_args(t))):
        if dataclasses.is_dataclass(arg):
            return arg, typing.get_origin(tp)
    return None, None


def rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every leaf key under `cls`, in declaration order."""
    hints, notes, out = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        sub, origin = _section_class(tp)
        if sub is not None:
            nested = key + ("[]" if origin is list else ".<key>" if origin is dict else "") + "."
            if notes.get(f.name):
                out.append((key, _type_text(tp).split(".")[-1], "", notes[f.name]))
            out.extend(rows(sub, nested))
            continue
        out.append((key, _type_text(tp), _default_text(f), notes.get(f.name, "")))
    return out


def undocumented(cls=None) -> list[str]:
    from pipelines.config import RunConfig
    return [key for key, _, _, note in rows(cls or RunConfig) if not note]


def reference() -> str:
    from pipelines.config import RunConfig
    md = [HEADER, "| key | type | default | what |", "| --- | --- | --- | --- |"]
    for key, tp, default, note in rows(RunConfig):
        md.append(f"| `{key}` | {tp.replace('|', chr(92) + '|')} | {default} | {note.replace('|', chr(92) + '|')} |")
    return "\n".join(md) + "\n"


def main(argv: list[str]) -> int:
    text = reference()
    if "--write" in argv:
        DOC.write_text(text)
        print(f"wrote {DOC} ({len(text.splitlines())} lines)")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
