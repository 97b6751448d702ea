"""mann.dispatch: the one place that chooses how a model runs, and refuses what an accelerated path does not declare."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from mann import dispatch
from mann.config import ConfigError
from mann.dnc import DNC, DNCConfig
from mann.ntm import NTM, NTMConfig
from mann.registry import build_model, make_model_config
from mann.train import _Run, config_from_flat_dict, make_train_config

I, O = 5, 4
DNC_TINY = {"memory_size": 7, "word_size": 4, "controller_size": 10, "read_heads": 2}


@dataclasses.dataclass(frozen=True)
class FlaggedDNCConfig(DNCConfig):
    """A DNC variant whose new flag neither mann.fast_dnc nor mann/csrc implements yet."""

    new_flag: bool = False


def test_every_field_of_todays_configs_is_declared_by_the_fused_path():
    """Declared means implemented and compared with the reference (tests/test_fast.py): today, all of them."""
    for model, cfg in ((NTM, NTMConfig), (DNC, DNCConfig)):
        assert set(dispatch.FUSED_IMPLEMENTS[model]) == {f.name for f in dataclasses.fields(cfg)}, model.__name__


@pytest.mark.parametrize("name", ["ntm", "dnc", "dnc-mds"])
def test_auto_takes_the_fused_path_on_cpu_and_reference_runs_when_asked(name):
    model = build_model(name, make_model_config(name), I, O)
    assert dispatch.choose(model, "auto").path == "fused"
    assert dispatch.choose(model, "reference").path == "reference"
    assert dispatch.forward_fn(model, "reference") is model


def test_a_model_without_an_accelerated_path_runs_its_reference():
    lstm = build_model("lstm", make_model_config("lstm"), I, O)
    assert dispatch.choose(lstm, "auto") == ("reference", "auto: no fused path for LSTMBaseline")
    with pytest.raises(ConfigError, match="fused cannot: no fused path for LSTMBaseline"):
        dispatch.choose(lstm, "fused")


def test_an_undeclared_dnc_flag_runs_the_reference_under_auto_and_is_refused_when_fused_is_asked():
    torch.manual_seed(0)
    model = DNC(FlaggedDNCConfig(**DNC_TINY, new_flag=True), I, O)
    with pytest.warns(RuntimeWarning, match="the reference runs: .*model.new_flag is not declared"):
        choice = dispatch.choose(model, "auto")
    assert choice.path == "reference" and "model.new_flag is not declared" in choice.why
    with pytest.raises(ConfigError, match=r"impl: expected a path that runs this model \(fused cannot: "
                                          r"model.new_flag is not declared\)"):
        dispatch.choose(model, "fused")
    # declaring the field (once the fused path implements it) is what lets it through
    declared = {DNC: {**dispatch.FUSED_IMPLEMENTS[DNC], "new_flag": (False,)}}
    assert dispatch.undeclared(model, declared) == "model.new_flag = True is not declared"
    model.cfg = dataclasses.replace(model.cfg, new_flag=False)
    assert dispatch.undeclared(model, declared) is None


def test_an_undeclared_value_of_a_declared_field_runs_the_reference(monkeypatch):
    ntm = build_model("ntm", make_model_config("ntm", {"controller": "feedforward"}), I, O)
    narrowed = {**dispatch.FUSED_IMPLEMENTS[NTM], "controller": ("lstm",)}
    monkeypatch.setitem(dispatch.FUSED_IMPLEMENTS, NTM, narrowed)
    with pytest.warns(RuntimeWarning, match="model.controller = 'feedforward' is not declared"):
        assert dispatch.choose(ntm, "auto").path == "reference"


def test_a_run_takes_impl_from_its_argument_or_the_environment(monkeypatch):
    cfg = make_train_config("dnc", "copy", {"device": "cpu", **{f"model.{k}": v for k, v in DNC_TINY.items()}})
    assert _Run(cfg).path == "fused"
    assert _Run(cfg, "reference").path == "reference"
    monkeypatch.setenv(dispatch.IMPL_ENV, "reference")
    assert _Run(cfg).path == "reference"
    monkeypatch.setenv(dispatch.IMPL_ENV, "fast")
    with pytest.raises(ConfigError, match="environment: MANN_IMPL: expected one of 'auto', 'reference', 'fused', "
                                          "'compiled'|one of auto, reference, fused, compiled"):
        _Run(cfg)


def test_impl_is_no_longer_a_model_setting():
    with pytest.raises(ConfigError, match="model.impl: expected no such key: how a model runs is chosen per run"):
        make_model_config("dnc", {"impl": "fast"})
    old = {"model": "ntm", "task": "copy", "model.impl": "auto", "model.memory_size": 16}  # an earlier run's params
    assert config_from_flat_dict(old).model_cfg.memory_size == 16


def test_the_models_import_nothing_faster_than_themselves():
    code = ("import sys, mann.ntm, mann.dnc, mann.lstm, mann.addressing, mann.memory; "
            "print(sorted(m for m in sys.modules if m.startswith('mann.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["mann.addressing", "mann.config", "mann.dnc", "mann.lstm", "mann.memory", "mann.ntm"]
