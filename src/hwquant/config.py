"""YAML + command-line configuration built from dataclasses.

Every command's options are the fields of a frozen dataclass.  :func:`add_arguments` turns the fields
into ``--flag`` options (help from ``field(metadata={"help": ...})``), :func:`resolve` merges
``defaults <- YAML file <- flags`` and validates the result, rejecting unknown YAML keys with a
suggestion.  :func:`dump_yaml` writes the resolved config next to the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert a YAML or flag value to the field's annotated type (one-line ConfigError if wrong)."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be null")
    if isinstance(value, str) and optional and value.lower() in ("none", "null"):
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or malformed YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(cls: type, yaml_values: dict[str, Any] | None = None, flags: dict[str, Any] | None = None,
            source: str = "config") -> Any:
    """Build ``cls`` from its defaults, then ``yaml_values``, then non-``None`` ``flags``; validate."""
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, val in (yaml_values or {}).items():
        if key not in types_:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown option {key!r} in {source}{hint}")
        values[key] = _coerce(key, val, types_[key])
    for key, val in (flags or {}).items():
        if val is not None and key in types_:
            values[key] = _coerce(key, val, types_[key])
    try:
        return cls(**values)
    except TypeError as e:  # missing required field
        raise ConfigError(str(e).split(".__init__() ")[-1]) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per dataclass field; every default is ``None`` so YAML values are not masked."""
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        base, optional = _unwrap_optional(types_[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else "required"
        choices = f.metadata.get("choices")
        full_help = f"{help_} (default: {default})" if help_ else f"(default: {default})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=full_help)
        else:
            conv = {int: int, float: float}.get(base, str)
            if optional:
                def conv(s, _c=conv):  # noqa: E306 - "none" clears an optional value
                    return None if s.lower() in ("none", "null") else _c(s)
            parser.add_argument(flag, dest=f.name, type=conv, default=None, choices=choices,
                                metavar=base.__name__.upper() if hasattr(base, "__name__") else "VALUE",
                                help=full_help)
