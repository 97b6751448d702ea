"""Validated, frozen configuration and the one override mechanism every entry point uses.

A configuration is a frozen dataclass with commented defaults. Overrides come as a flat
mapping of dotted keys (``lr``, ``model.memory_size``, ``task.max_length``) from the command
line (``--set key=value``) or a study file; every key must name an existing field and every
value is coerced to the field's type, or a :class:`ConfigError` names the key and what was
expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A bad configuration value: names the source (file), the key and what was expected."""

    def __init__(self, key: str, expected: str, got: Any = dataclasses.MISSING, source: str | None = None):
        self.key, self.expected, self.got, self.source = key, expected, got, source
        super().__init__(self._line())

    def _line(self) -> str:
        where = f"{self.source}: " if self.source else ""
        got = "" if self.got is dataclasses.MISSING else f", got {self.got!r}"
        return f"{where}{self.key}: expected {self.expected}{got}"

    def with_source(self, source: str, prefix: str = "") -> ConfigError:
        """The same error, attributed to a file and (optionally) a key prefix."""
        return ConfigError(prefix + self.key, self.expected, self.got, source)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return "a list of " + _type_name(get_args(tp)[0])
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _parse_scalar_string(text: str) -> Any:
    """Command-line values arrive as strings: read them the way YAML would."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError(key, ...). Strings are parsed as YAML scalars."""
    origin = get_origin(tp)
    if isinstance(value, str) and tp is not str and origin is not Literal:
        if not (origin in (Union, types.UnionType) and str in get_args(tp)):
            value = _parse_scalar_string(value)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, _type_name(tp), value)
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(key, _type_name(tp), value)
    if origin is tuple:
        (item_tp, *_rest) = get_args(tp)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(key, _type_name(tp), value)
        return tuple(coerce(v, item_tp, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, "true/false", value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(key, "an integer", value)
        return int(value)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, "a string", value)
        return value
    if tp is Any:
        return value
    raise ConfigError(key, _type_name(tp), value)


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (works with ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def replace_checked(cfg: Any, overrides: Mapping[str, Any], prefix: str = "") -> Any:
    """``dataclasses.replace`` that refuses unknown keys and coerces values to the field types.

    ``prefix`` is only used to name keys in errors (``model.`` for a model config).
    The dataclass's own ``__post_init__`` then checks impossible values.
    """
    types_ = field_types(type(cfg))
    changes = {}
    for key, value in overrides.items():
        if key not in types_:
            known = ", ".join(sorted(types_))
            raise ConfigError(prefix + key, f"a known key of {type(cfg).__name__} ({known})")
        changes[key] = coerce(value, types_[key], prefix + key)
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError as err:
        raise ConfigError(prefix + err.key, err.expected, err.got) from None


def check(condition: bool, key: str, expected: str, got: Any = dataclasses.MISSING) -> None:
    """For ``__post_init__``: raise ConfigError unless ``condition``."""
    if not condition:
        raise ConfigError(key, expected, got)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (possibly nested) as plain, JSON/YAML-friendly data."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys: {"model": {"memory_size": 128}} -> {"model.memory_size": 128}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def parse_set_args(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "model.memory_size=64"]`` -> dict; values stay strings (coerced later)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "key=value")
        out[key.strip()] = value.strip()
    return out
