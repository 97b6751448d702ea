"""Validated, frozen configuration and the one override mechanism every entry point uses.

A configuration is a frozen dataclass with commented defaults. Overrides come as a flat
mapping of dotted keys (``lr``, ``model.memory_size``, ``task.max_length``) from the command
line (``--set key=value``) or a study file; every key must name an existing field and every
value is coerced to the field's type, or a :class:`ConfigError` names the key and what was
expected.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

# A user's value quoted in a message is cut to this many characters and "…": an expanded YAML alias
# or a whole file read as one string would otherwise fill the terminal with one line.
QUOTE_CHARS = 60
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, QUOTE_CHARS, QUOTE_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def quoted(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters and ``…``.

    reprlib stops after a few items and levels, so a huge or deeply shared structure (an expanded alias
    bomb) is never turned into a long string first; repr escapes line breaks, so the result is one line.
    """
    text = repr(value[: limit + 1]) if isinstance(value, str) else _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def one_line(text: str, limit: int = 1000) -> str:
    """A message as one line of at most ``limit`` characters (the command line prints every error through it)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class ConfigError(ValueError):
    """A bad configuration value: names the source (file), the key and what was expected."""

    def __init__(self, key: str, expected: str, got: Any = dataclasses.MISSING, source: str | None = None):
        self.key, self.expected, self.got, self.source = key, expected, got, source
        super().__init__(self._line())

    def _line(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = self.key if isinstance(self.key, str) and len(self.key) <= QUOTE_CHARS else quoted(self.key)
        got = "" if self.got is dataclasses.MISSING else f", got {quoted(self.got)}"
        return f"{where}{key or '(top level)'}: expected {self.expected}{got}"

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
        # float('inf').is_integer() and float('nan').is_integer() are False: neither reaches int()
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                isinstance(value, float) and not value.is_integer()):
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
        if not math.isfinite(value):  # .inf / .nan: no setting means "infinite" (null does, where allowed)
            raise ConfigError(key, "a finite number", value)
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


# Limits on values no machine can hold, checked when a configuration is read (a study file, --set) rather
# than when a trial crashes or is killed for memory.
#
# A trial trains on one device, and the largest accelerators hold 141-192 GB (H200, B200). A configuration
# whose tensors for one training step cannot fit in MAX_DEVICE_BYTES is refused, naming the limit:
# generous for any GPU cluster, and finite.
MAX_DEVICE_BYTES = 256 * 2**30
# Sizes of a task (lengths, counts of items, facts or nodes, bits per vector): Graves (2014) trained copy on
# lengths 1-20 and tested up to 120, and the bAbI stories hold a few hundred facts. 2^16 is far beyond any of
# them (a generalization scale multiplies it further); a larger value is a typo that would build sequences of
# millions of steps.
MAX_TASK_SIZE = 2**16
# torch.manual_seed takes a 64-bit integer, signed or unsigned.
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_limits(cfg: Any) -> None:
    """Refuse a TrainConfig (``mann.train``) that no machine can run; ConfigError naming the key and the limit.

    Seeds must be integers torch takes; every integer of the task config at most MAX_TASK_SIZE, also at the
    largest generalization scale; and the tensors of one step (:func:`_step_bytes`) at most MAX_DEVICE_BYTES.
    """
    for key in ("seed", "eval_seed"):
        value = getattr(cfg, key)
        if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise ConfigError(key, "a 64-bit integer (torch.manual_seed's seed: -2**63 to 2**64 - 1)", value)
    sizes = {f.name: getattr(cfg.task_cfg, f.name) for f in dataclasses.fields(cfg.task_cfg)}
    sizes = {name: v for name, v in sizes.items() if isinstance(v, int) and not isinstance(v, bool)}
    if sizes:
        name = max(sizes, key=sizes.get)
        if sizes[name] > MAX_TASK_SIZE:
            raise ConfigError(f"task.{name}", f"at most {MAX_TASK_SIZE:,} (a size no task needs more of)", sizes[name])
        scale = max(cfg.gen_scales, default=1.0)  # generalization evaluations multiply the task's sizes
        if sizes[name] * scale > MAX_TASK_SIZE:
            raise ConfigError("gen_scales", f"scales that keep task.{name} ({sizes[name]}) at most {MAX_TASK_SIZE:,}",
                              list(cfg.gen_scales))
    need, factors = _step_bytes(cfg)
    if need > MAX_DEVICE_BYTES:
        key = max(factors, key=factors.get)
        raise ConfigError(key, f"a size that fits on one device (at most {MAX_DEVICE_BYTES / 2**30:g} GiB for "
                               f"one step's tensors; this configuration needs over {need / 2**30:,.0f} GiB)",
                          factors[key])


def _step_bytes(cfg: Any) -> tuple[float, dict[str, int]]:
    """A lower bound on the bytes one step of one batch B needs, and the sizes of its largest term.

    The memory matrix [B, N, W] (NTM, DNC), the DNC's temporal link matrices [B, Hw, N, N], and the
    controller's recurrent gate weights 4·C² per layer (LSTM) with their gradient and two optimizer moments.
    Backpropagation through time keeps every step's state, so a run needs more; the bound refuses only
    what cannot fit at all.
    """
    m, batch = cfg.model_cfg, cfg.batch_size
    terms: list[tuple[float, dict[str, int]]] = [(0, {"batch_size": batch})]  # (elements, the keys multiplied)
    if hasattr(m, "memory_size") and hasattr(m, "word_size"):
        terms.append((batch * m.memory_size * m.word_size,
                      {"batch_size": batch, "model.memory_size": m.memory_size, "model.word_size": m.word_size}))
        if cfg.model.startswith("dnc"):  # every DNC variant keeps Hw link matrices of N x N per sequence
            terms.append((batch * m.write_heads * m.memory_size ** 2,
                          {"batch_size": batch, "model.memory_size": m.memory_size}))
    for name in ("controller_size", "hidden_size"):
        if hasattr(m, name):
            size = getattr(m, name)
            terms.append((4 * 4 * size ** 2 * getattr(m, "layers", 1), {f"model.{name}": size}))
    need = (8 if cfg.dtype == "float64" else 4) * sum(elements for elements, _ in terms)
    return need, max(terms, key=lambda term: term[0])[1]
