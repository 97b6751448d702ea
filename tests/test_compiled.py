"""mann.compiled (the CUDA path: torch.compile of the model's own step) checked on CPU through inductor's C++ backend.

One compiled step per model, shared by every test of the module (compiling is the cost: about a minute of CPU per
model): the NTM, and the DNC with all three of Csordás & Schmidhuber's fixes and two write heads (every branch the
DNC variants add to DNC.step). Forward and every gradient against the reference in float64; sequence lengths and a
second model of the same configuration (the next trial of a sweep) reuse the compiled step.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mann import compiled, dispatch
from mann.registry import build_model, make_model_config

I, O, B = 5, 4, 3
TOL = 1e-9  # float64; inductor may reassociate sums, so not bit for bit
CASES = {
    "ntm": {"memory_size": 8, "word_size": 4, "controller_size": 8},
    "dnc-mds": {"memory_size": 7, "word_size": 4, "controller_size": 8, "read_heads": 2, "write_heads": 2,
                "mask_min": 0.1},
}


def _model(name: str, seed: int):
    torch.manual_seed(seed)
    return build_model(name, make_model_config(name, CASES[name]), I, O).double()


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model = _model(request.param, 0)
    return request.param, model, compiled.forward_fn(model)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _check(model, forward, T: int, seed: int):
    x = torch.randn(B, T, I, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    inputs = [x, *model.parameters()]
    y_ref = model(x)
    y = forward(x)
    assert torch.allclose(y, y_ref, rtol=TOL, atol=TOL), (y - y_ref).abs().max()
    probe = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    names = ["x", *(n for n, _ in model.named_parameters())]
    for name, a, b in zip(names, torch.autograd.grad(y_ref, inputs, probe), torch.autograd.grad(y, inputs, probe),
                          strict=True):
        assert torch.allclose(a, b, rtol=TOL, atol=TOL), f"{name}: {(a - b).abs().max().item():.2e}"


def test_compiled_step_matches_the_reference_in_forward_and_gradients_across_lengths(case):
    name, model, forward = case
    _check(model, forward, T=4, seed=0)
    graphs = _graphs()
    for T in (1, 7):  # other sequence lengths: the same compiled step, called more or fewer times
        _check(model, forward, T=T, seed=T)
    assert _graphs() == graphs, "a new sequence length recompiled the step"


def test_a_second_model_of_the_same_configuration_reuses_the_compiled_step(case):
    """The next trial of a sweep on this worker: new weights, shapes already seen, no new graph; its own weights
    are what the compiled step uses."""
    name, model, forward = case
    _check(model, forward, T=4, seed=0)
    graphs = _graphs()
    other = _model(name, 1)
    _check(other, compiled.forward_fn(other), T=4, seed=0)
    assert _graphs() == graphs, "the second model recompiled the step"


def test_dispatch_runs_the_compiled_path_when_asked(case):
    name, model, _ = case
    assert dispatch.choose(model, "compiled").path == "compiled"
    assert dispatch.choose(model, "auto").path == "fused"  # CPU: the fused kernels stay the default
    graphs = _graphs()
    x = torch.randn(B, 4, I, dtype=torch.float64).requires_grad_()  # as in the tests above: the same graphs
    assert torch.allclose(dispatch.forward_fn(model, "compiled")(x), model(x), rtol=TOL, atol=TOL)
    assert _graphs() == graphs
