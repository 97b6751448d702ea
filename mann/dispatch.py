"""How a model runs: its own reference code, or the accelerated path for its device. The one place that chooses.

The models (mann.ntm, mann.dnc, mann.lstm) know nothing of this module: ``model(x)`` is always the reference, the
papers' maths step by step with autograd. An accelerated path computes the same function faster:

- ``fused`` (CPU): mann.fast_ntm / mann.fast_dnc, each step one call into mann/csrc's kernels (built by
  mann.native) with a hand-written backward. It implements only the configuration fields it declares
  (:data:`FUSED_IMPLEMENTS`): a field, or a value of it, that it does not declare runs the reference instead, so a
  new model flag can never silently run the old maths. Tests compare it with the reference at 1e-10 in float64.
- ``compiled``: the model's own ``step`` through ``torch.compile`` (on CUDA with CUDA graphs,
  ``mode="reduce-overhead"``), one compiled step per model, the time loop in Python so that no sequence length
  recompiles. It runs the reference maths itself, so it implements every field by construction.

``impl`` chooses, per run (``fit(..., impl=...)``, else the ``MANN_IMPL`` environment variable, else ``auto``): it
is how a run executes, not a hyperparameter, so it is not part of any config and is not logged.

- ``auto``: ``fused`` where it applies (CPU, the kernels built, every config field declared), else the reference.
  A field the fused path does not declare gives a one-line warning naming it, and the reference runs: ``auto`` must
  run every configuration correctly; being slower is the lesser failure. CUDA runs the reference under ``auto``
  until ``compiled`` has been measured faster there (docs/gpu.md).
- ``reference``, ``fused``, ``compiled``: that path; an explicit ``fused`` that does not apply is an error saying
  why (a benchmark or test that asked for it must not measure the reference unknowingly).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from mann.config import ConfigError
from mann.dnc import DNC
from mann.ntm import NTM

Impl = Literal["auto", "reference", "fused", "compiled"]
IMPLS: tuple[str, ...] = get_args(Impl)
IMPL_ENV = "MANN_IMPL"

ANY = None  # in a declaration: every value of the field is implemented

# The configuration fields the fused CPU path implements, per model class, and the values of each (ANY: all).
# A field missing here makes dispatch run the reference: adding a field to NTMConfig or DNCConfig means adding it
# here once mann.fast_ntm / mann.fast_dnc and mann/csrc implement it (tests/test_fast.py compares them).
FUSED_IMPLEMENTS: dict[type, Mapping[str, tuple | None]] = {
    NTM: {
        "controller": ("lstm", "feedforward"), "controller_size": ANY, "memory_size": ANY, "word_size": ANY,
        "read_heads": ANY, "write_heads": ANY, "shift_range": ANY,
        # M_0 comes from NTM.initial_state, the reference's own (differentiable) code, for every scheme
        "memory_init": ("constant", "learned", "random", "constant_trained", "random_trained"),
        "clip_value": ANY, "forget_bias": ANY, "layer_init": ANY,  # these two only set the initial weights
    },
    DNC: {
        "controller_size": ANY, "memory_size": ANY, "word_size": ANY, "read_heads": ANY, "write_heads": ANY,
        "masking": ANY, "deallocation": ANY, "sharpness": ANY, "mask_min": ANY, "clip_value": ANY,
        "forget_bias": ANY,
    },
}

Forward = Callable[..., Tensor]  # (x [B, T, I], state=None, memory_size=None) -> logits [B, T, O]


class Choice(NamedTuple):
    path: Literal["reference", "fused", "compiled"]
    why: str  # one line: why this path (for a fallback: what the accelerated path lacks)


def default_impl() -> str:
    """``MANN_IMPL`` if set, else ``auto``; ConfigError for any other value."""
    value = os.environ.get(IMPL_ENV, "auto") or "auto"
    if value not in IMPLS:
        raise ConfigError(IMPL_ENV, "one of " + ", ".join(IMPLS), value, source="environment")
    return value


def undeclared(model: nn.Module, implements: Mapping[type, Mapping[str, tuple | None]]) -> str | None:
    """The first field of ``model.cfg`` (or value of it) that the declaration ``implements`` for the model's class
    does not cover, as one line; None if it covers them all."""
    declared = implements.get(type(model))
    if declared is None:
        return f"{type(model).__name__} is not declared"
    cfg = model.cfg
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in declared:
            return f"model.{f.name} is not declared"
        if declared[f.name] is not ANY and value not in declared[f.name]:
            return f"model.{f.name} = {value!r} is not declared"
    return None


def fused_unsupported(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused CPU path cannot run ``model`` (None: it can). Builds the kernels on first use."""
    from mann import fast

    if not isinstance(model, NTM | DNC):
        return f"no fused path for {type(model).__name__}"
    if device.type != "cpu":
        return f"the fused kernels run on CPU, not {device.type}"
    if dtype not in (torch.float32, torch.float64):
        return f"the fused kernels take float32/float64, not {dtype}"
    why = fast.unsupported(model) or undeclared(model, FUSED_IMPLEMENTS)
    if why is not None:
        return why
    if fast.kernels_for(model) is None:
        return "mann/csrc's kernels could not be built here (see the warning above)"
    return None


_warned: set[str] = set()


def choose(model: nn.Module, impl: str | None = None) -> Choice:
    """The path ``model`` runs on its parameters' device under ``impl`` (None: :func:`default_impl`); ConfigError if
    ``impl`` asks for one that cannot run it. Choose after moving the model to its device and dtype."""
    impl = default_impl() if impl is None else impl
    if impl not in IMPLS:
        raise ConfigError("impl", "one of " + ", ".join(IMPLS), impl)
    ref = next(model.parameters())
    if impl == "reference":
        return Choice("reference", "asked for")
    if impl == "compiled":
        return Choice("compiled", "asked for")
    why = fused_unsupported(model, ref.device, ref.dtype)
    if impl == "fused":
        if why is not None:
            raise ConfigError("impl", f"a path that runs this model (fused cannot: {why})", impl)
        return Choice("fused", "asked for")
    if why is None:
        return Choice("fused", "auto: the fastest measured on CPU")
    if why == undeclared(model, FUSED_IMPLEMENTS) and why not in _warned:  # a config it does not implement: say so
        _warned.add(why)
        warnings.warn(f"mann.dispatch: the reference runs: the fused path does not implement this model ({why})",
                      RuntimeWarning, stacklevel=3)
    return Choice("reference", f"auto: {why}")


def forward_fn(model: nn.Module, path: str) -> Forward:
    """What to call instead of ``model`` to run it on ``path`` (a :class:`Choice`'s)."""
    if path == "fused":
        from mann import fast

        return lambda x, state=None, memory_size=None: fast.forward(model, x, state, memory_size)
    if path == "compiled":
        from mann import compiled

        return compiled.forward_fn(model)
    return model
