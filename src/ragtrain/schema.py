"""Frozen dataclasses built from parsed YAML, checking every value's type and range.

``build(cls, mapping, prefix)`` rejects unknown keys, wrong types and out-of-range values, naming
the dotted key and the bad value; the range checks are a field's metadata (ge, gt, le, lt,
pattern; min_items for lists).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from ragtrain.errors import ConfigError


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return build(tp, value, key)
    if origin is types.UnionType:  # str | list[str]: the first alternative that fits
        for alt in typing.get_args(tp):
            with contextlib.suppress(ConfigError):
                return coerce(value, alt, key)
        alts = " or ".join(type_name(a) for a in typing.get_args(tp))
        raise ConfigError(f"{key}: expected {alts}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        # by type too: 1 == True in Python, but `enabled: 1` is not `enabled: true`
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {type_name(item_tp)}, got {value!r}")
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            hint = " (write numbers like 1.0e-4)" if isinstance(value, str) else ""
            raise ConfigError(f"{key}: expected a number, got {value!r}{hint}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


def check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    vals = value if isinstance(value, list) else [value]
    if "min_items" in meta and len(vals) < meta["min_items"]:
        raise ConfigError(f"{key}: must hold at least {meta['min_items']} item(s), got {value!r}")
    for v in vals:
        if "ge" in meta and not v >= meta["ge"]:
            raise ConfigError(f"{key}: must be >= {meta['ge']}, got {v!r}")
        if "gt" in meta and not v > meta["gt"]:
            raise ConfigError(f"{key}: must be > {meta['gt']}, got {v!r}")
        if "le" in meta and not v <= meta["le"]:
            raise ConfigError(f"{key}: must be <= {meta['le']}, got {v!r}")
        if "lt" in meta and not v < meta["lt"]:
            raise ConfigError(f"{key}: must be < {meta['lt']}, got {v!r}")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], v):
            raise ConfigError(f"{key}: must match {meta['pattern']}, got {v!r}")


def build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(fields)
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (known keys here: {known})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}"
        v = coerce(value, hints[name], key)
        check_range(v, fields[name].metadata, key)
        kwargs[name] = v
    try:
        return cls(**kwargs)
    except ConfigError as e:  # cross-field checks in __post_init__
        raise ConfigError(f"{prefix}.{e}") from None
