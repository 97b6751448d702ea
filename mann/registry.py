"""One registry by name for models; tasks register in :mod:`mann.tasks`.

A model name maps to its config class, its module class and preset overrides, so the DNC
variants of Csordás & Schmidhuber (2019) are configurations, not classes:
``dnc-md`` = masking + de-allocation, ``dnc-ms`` = masking + sharpness, ``dnc-mds`` = all three.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mann.config import ConfigError, replace_checked


@dataclass(frozen=True)
class ModelEntry:
    module: str  # where the classes live, imported on first use
    config_class: str
    model_class: str
    presets: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_class)

    def model_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.model_class)


MODELS: dict[str, ModelEntry] = {
    "ntm": ModelEntry("mann.ntm", "NTMConfig", "NTM", description="Neural Turing Machine (Graves 2014)"),
    "dnc": ModelEntry("mann.dnc", "DNCConfig", "DNC", description="Differentiable Neural Computer (Graves 2016)"),
    "dnc-md": ModelEntry(
        "mann.dnc", "DNCConfig", "DNC", {"masking": True, "deallocation": True},
        "DNC with key/value masking and de-allocation (Csordás & Schmidhuber 2019)",
    ),
    "dnc-ms": ModelEntry(
        "mann.dnc", "DNCConfig", "DNC", {"masking": True, "sharpness": True},
        "DNC with key/value masking and link sharpness control (Csordás & Schmidhuber 2019)",
    ),
    "dnc-mds": ModelEntry(
        "mann.dnc", "DNCConfig", "DNC", {"masking": True, "deallocation": True, "sharpness": True},
        "DNC with all three fixes of Csordás & Schmidhuber (2019)",
    ),
    "lstm": ModelEntry("mann.lstm", "LSTMConfig", "LSTMBaseline", description="LSTM baseline"),
}


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ConfigError("model", "one of " + ", ".join(sorted(MODELS)), name)
    return MODELS[name]


def make_model_config(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The model's frozen config: class defaults, then the variant's presets, then ``overrides``."""
    entry = model_entry(name)
    if "impl" in (overrides or {}):
        raise ConfigError("model.impl", "no such key: how a model runs is chosen per run, not per model "
                          "(MANN_IMPL=auto|reference|fused|compiled, or fit(impl=...); see mann/dispatch.py)")
    cfg = replace_checked(entry.config_cls()(), entry.presets, prefix="model.")
    return replace_checked(cfg, overrides or {}, prefix="model.")


def model_fields(name: str) -> set[str]:
    """The keys ``model.<key>`` accepted for this model."""
    import dataclasses

    return {f.name for f in dataclasses.fields(model_entry(name).config_cls())}


def build_model(name: str, cfg: Any, input_size: int, output_size: int):
    """An ``nn.Module`` implementing the model protocol (see docs/architecture.md)."""
    return model_entry(name).model_cls()(cfg, input_size, output_size)
