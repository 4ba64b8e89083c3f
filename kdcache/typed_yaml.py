"""YAML into typed dataclasses: every key checked against its type hint, every error naming the dotted key.

Generic (it knows no kdcache field): `build(cls, data, where)` turns a parsed YAML mapping into the dataclass
`cls`, refusing unknown keys (with the closest allowed one), wrong types, values outside a Literal and missing
required keys (a field with metadata {"yaml": False} is set by code, never read). `${VAR}` and `${VAR:-default}` in strings are expanded from the environment; a non-string value
written whole as `"${VAR:-default}"` is expanded and then read as a YAML scalar (an int, a float, null, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Literal

import yaml

from kdcache.errors import KdcacheError


class ConfigError(KdcacheError):
    """A config file that cannot be used; the message names the file and key."""


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str, where: str) -> str:
    def repl(m: re.Match) -> str:
        value = os.environ.get(m.group(1), m.group(2))
        if value is None:
            raise ConfigError(f"{where}: environment variable {m.group(1)} is not set")
        return value

    return _ENV.sub(repl, text)


def convert(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the type hint `hint`, converting where YAML is loose (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, str) and str not in (hint, *args) and _ENV.fullmatch(value.strip()):
        value = yaml.safe_load(expand_env(value, where))
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return expand_env(value, where)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")


def build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    unknown = sorted(set(data) - names)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} ({hint}allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = convert(data[f.name], hints[f.name], f"{where}.{f.name}" if where else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {f.name!r}")
    return cls(**kwargs)
