"""docs/config.md is generated from the config classes' field comments: it must be current, and every key must
have a description."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines import configref


@dataclass
class Toy:
    # Two lines above
    # the field.
    a: int = 1
    b: str = "x"               # at the end of its line
    c: list[int] = field(default_factory=list)
    d: bool = False            # both: inline


@dataclass
class Outer:
    name: str
    toys: list[Toy] = field(default_factory=list)   # each toy


def test_field_comments_take_the_lines_above_and_the_end_of_the_line():
    assert configref.field_comments(Toy) == {"a": "Two lines above the field.", "b": "at the end of its line",
                                             "c": "", "d": "both: inline"}


def test_rows_walk_nested_sections_with_defaults():
    rows = {key: (tp, default, note) for key, tp, default, note in configref.rows(Outer)}
    assert rows["name"] == ("str", "required", "")
    assert rows["toys"][2] == "each toy"
    assert rows["toys[].a"] == ("int", "`1`", "Two lines above the field.")
    assert rows["toys[].b"] == ("str", "`'x'`", "at the end of its line")
    assert configref.undocumented(Outer) == ["name", "toys[].c"]


def test_every_config_key_has_a_description():
    assert configref.undocumented() == []


def test_docs_config_md_is_current():
    """Regenerate with `python -m pipelines.configref --write` after changing a config class."""
    assert configref.DOC.read_text() == configref.reference()
