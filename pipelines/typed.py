"""Build typed dataclasses from plain YAML data, rejecting unknown keys and wrong types by name."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union


class ConfigTypeError(Exception):
    """A key that does not exist or a value of the wrong type; `key` is dotted (a.b.c)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigTypeError(key, f"must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigTypeError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigTypeError(key, f"expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigTypeError(key, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigTypeError(key, f"expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        # bool is an int in Python; `steps: true` is still a type error.
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigTypeError(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
    raise ConfigTypeError(key, f"unsupported type {_type_name(tp)}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from `data`; missing keys take the dataclass defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigTypeError(key, f"unknown key (known: {known})")
        kwargs[k] = _convert(v, hints[k], key)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigTypeError(f"{prefix}.{missing[0]}" if prefix else missing[0], "required key is missing")
    return cls(**kwargs)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Apply one `a.b.c=value` override to nested dicts (creating mappings as needed)."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigTypeError(".".join(parts[: i + 1]), "is not a mapping; cannot set a sub-key")
        node = nxt
    node[parts[-1]] = value
