"""The fused CPU path (mann.fast, mann.fast_ntm, mann.fast_dnc, mann/csrc) against the reference models, in float64.

Every comparison runs the reference model (autograd through mann.ntm / mann.dnc) and the fused path on the same
weights and input, and requires the logits and every gradient (weights, input, initial state) to agree to ~1e-10
relative. Configurations cover each option that changes the maths: controller kind, head counts, shift range,
memory init, clipping on/off/active, the DNC variants, several write heads, and the link checkpointing. That the
kernels' constants equal the reference's is checked by the comparisons and, by name, in
test_the_kernels_use_the_reference_constants.
"""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mann.fast as fast
import mann.fast_dnc as fast_dnc
import mann.fast_ntm as fast_ntm
from mann import addressing, dispatch, native
from mann.registry import build_model, make_model_config

I, O, B, T = 5, 4, 3, 9
NTM_TINY = {"memory_size": 8, "word_size": 4, "controller_size": 10}
DNC_TINY = {"memory_size": 7, "word_size": 4, "controller_size": 10, "read_heads": 2}
TOL = 1e-10


def _model(name, overrides, weight_scale=1.0):
    """A float64 model: its own forward is the reference code, fast.forward runs the fused path on it."""
    torch.manual_seed(0)
    model = build_model(name, make_model_config(name, overrides), I, O).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)  # > 1 pushes head parameters and logits into the clip
    return model


def _random_state(model, batch):
    """A state with every field non-trivial (usage, links and precedences away from 0), requiring grad."""
    state = model.initial_state(batch)
    g = torch.Generator().manual_seed(1)
    out = []
    for field, value in zip(state._fields, state, strict=True):
        if field == "controller":
            out.append(tuple((0.5 * torch.randn(v.shape, generator=g, dtype=v.dtype)).requires_grad_() for v in value))
            continue
        x = torch.rand(value.shape, generator=g, dtype=value.dtype)
        if field in ("read_weights", "write_weights", "precedence"):
            x = 0.9 * x / x.sum(-1, keepdim=True)
        if field == "link":
            x = 0.5 * x / x.sum(-1, keepdim=True)
            x = x * (1 - torch.eye(x.shape[-1], dtype=x.dtype))
        if field in ("memory", "reads"):
            x = 2 * x - 1
        out.append(x.requires_grad_())
    return type(state)(*out)


def _leaves(state):
    return [t for v in state for t in (v if isinstance(v, tuple) else (v,))]


def _compare(model, state=None):
    """Reference vs fast: logits and gradients of a random linear function of them."""
    x = torch.randn(B, T, I, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    inputs = [x, *model.parameters(), *(_leaves(state) if state is not None else [])]
    torch.manual_seed(3)  # a random memory init draws from the global RNG: the same draw for both
    y_ref = model(x, state)
    torch.manual_seed(3)
    y_fast = fast.forward(model, x, state)
    assert torch.allclose(y_fast, y_ref, rtol=TOL, atol=TOL), (y_fast - y_ref).abs().max()
    probe = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g_ref = torch.autograd.grad(y_ref, inputs, probe, allow_unused=True)
    g_fast = torch.autograd.grad(y_fast, inputs, probe, allow_unused=True)
    names = ["x", *(n for n, _ in model.named_parameters()), *(f"state{i}" for i in range(len(inputs)))]
    for name, a, b in zip(names, g_ref, g_fast, strict=False):
        assert (a is None) == (b is None), name
        if a is not None:
            scale = a.abs().max().clamp_min(1e-300)
            assert ((a - b).abs().max() / scale) < TOL, f"{name}: {((a - b).abs().max() / scale).item():.2e}"
    return y_ref


# -- NTM ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def kernels():
    """The fused kernels, built (CI has a C++ compiler)."""
    assert fast_ntm.heads_kernels() is not None, native._why_not
    assert fast_dnc.step_kernels() is not None, native._why_not


@pytest.mark.parametrize("overrides", [
    {},
    {"read_heads": 2, "write_heads": 2, "shift_range": 2},
    {"read_heads": 3, "write_heads": 1, "shift_range": 0},
    {"controller": "feedforward"},
    {"memory_init": "learned"},
    {"memory_init": "random"},
    {"memory_init": "constant_trained"},
    {"memory_init": "random_trained"},
    {"clip_value": None},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_ntm_fast_matches_reference(overrides, kernels):
    _compare(_model("ntm", {**NTM_TINY, **overrides}))


@pytest.mark.parametrize("name,tiny", [("ntm", NTM_TINY), ("dnc", DNC_TINY)])
def test_fast_matches_reference_with_active_clipping(name, tiny, kernels):
    model = _model(name, {**tiny, "clip_value": 0.7}, weight_scale=4.0)
    raws = []
    model.interface.register_forward_hook(lambda module, args, out: raws.append(out.detach()))
    _compare(model)
    clipped = torch.cat([r.flatten() for r in raws]).abs() > 0.7
    assert 0 < clipped.float().mean() < 1  # the clip bites somewhere but not everywhere: its mask is tested


def test_ntm_fast_matches_reference_from_a_given_state_and_larger_memory(kernels):
    model = _model("ntm", NTM_TINY)
    _compare(model, _random_state(model, B))
    x = torch.randn(B, T, I, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(fast.forward(model, x, memory_size=16), model(x, memory_size=16), rtol=TOL, atol=TOL)


def test_ntm_fast_matches_reference_on_a_blank_memory_and_saturated_heads(kernels):
    """Degenerate inputs: M_0 = 0 (every |M_i| at its floor, K = 0) and weights large enough to saturate the
    squashes (sharp softmaxes, gates at 0 or 1) without a clip: finite, and still the reference's numbers."""
    model = _model("ntm", {**NTM_TINY, "clip_value": None, "memory_init": "constant"}, weight_scale=3.0)
    state = _random_state(model, B)
    blank = state._replace(memory=torch.zeros_like(state.memory).requires_grad_())
    y = _compare(model, blank)
    assert torch.isfinite(y).all()


def test_the_kernels_build_here_and_where_they_cannot_the_reference_runs(tmp_path, monkeypatch):
    assert native.kernels("ntm_heads") is not None, native._why_not.get("ntm_heads")  # CI has a C++ compiler
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("MANN_NATIVE_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that fails
    with pytest.warns(RuntimeWarning, match="ntm_heads kernels could not be built"):
        assert native.kernels("ntm_heads") is None
    with pytest.warns(RuntimeWarning, match="lstm_cell kernels could not be built"):
        assert fast_ntm.heads_kernels() is None
    model = _model("ntm", NTM_TINY)
    assert dispatch.choose(model, "auto") == ("reference", "auto: mann/csrc's kernels could not be built here "
                                                            "(see the warning above)")
    with pytest.raises(ValueError, match="kernels could not be built"):
        fast.forward(model, torch.randn(B, T, I, dtype=torch.float64))


# -- DNC ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,overrides", [
    ("dnc", {}),
    ("dnc", {"write_heads": 2}),
    ("dnc", {"read_heads": 1}),
    ("dnc-md", {}),
    ("dnc-ms", {}),
    ("dnc-mds", {"write_heads": 2}),
    ("dnc", {"clip_value": None}),
    ("dnc-md", {"mask_min": 0.1}),
    ("dnc-mds", {"mask_min": 0.4, "write_heads": 2}),
])
def test_dnc_fast_matches_reference(name, overrides, kernels):
    _compare(_model(name, {**DNC_TINY, **overrides}))


@pytest.mark.parametrize("name", ["dnc", "dnc-mds"])
def test_dnc_fast_matches_reference_from_a_given_state(name, kernels):
    model = _model(name, {**DNC_TINY, "write_heads": 2})
    _compare(model, _random_state(model, B))


def test_dnc_link_checkpointing_gives_the_same_gradients(monkeypatch, kernels):
    """With links too big to keep, every ~sqrt(T)-th is kept and the rest recomputed in backward."""
    model = _model("dnc", DNC_TINY)
    kept = []
    original = fast_dnc.LinkHistory.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        kept.append(self)

    monkeypatch.setattr(fast_dnc, "LINK_KEEP_BYTES", 0)
    monkeypatch.setattr(fast_dnc.LinkHistory, "__init__", spy)
    _compare(model, _random_state(model, B))
    assert kept[-1].every > 1 and len(kept[-1].kept) < T + 1


@pytest.mark.parametrize("usage", ["zero", "one", "ties"])
@pytest.mark.parametrize("name", ["dnc", "dnc-mds"])
def test_dnc_fast_matches_reference_on_degenerate_usage_and_a_blank_memory(name, usage, kernels):
    """Usage all 0 (the free list in index order) or all tied at 0.5 (the stable sort must keep index order), on
    M_0 = 0 (every |M[i]| at its floor); or all 1 (allocation 0 everywhere). Read and write weights 0, so the
    first step's usage is exactly that in both paths. (Not with usage 1 on a blank memory: every slot then reads
    alike, the next usages tie again but as computed values, and which of them sorts first depends on rounding.)"""
    model = _model(name, {**DNC_TINY, "write_heads": 2})
    state = _random_state(model, B)
    value = {"zero": 0.0, "one": 1.0, "ties": 0.5}[usage]
    zeros = {f: torch.zeros_like(getattr(state, f)).requires_grad_() for f in ("read_weights", "write_weights")}
    state = state._replace(usage=torch.full_like(state.usage, value).requires_grad_(), **zeros)
    if usage != "one":
        state = state._replace(memory=torch.zeros_like(state.memory).requires_grad_())
    y = _compare(model, state)
    assert torch.isfinite(y).all()


def test_no_grad_forward_matches_and_keeps_nothing():
    for name, tiny in (("ntm", NTM_TINY), ("dnc", DNC_TINY)):
        model = _model(name, tiny)
        x = torch.randn(B, T, I, dtype=torch.float64)
        with torch.no_grad():
            y = fast.forward(model, x)
            assert not y.requires_grad
            assert torch.allclose(y, model(x), rtol=TOL, atol=TOL)


def test_unsupported_models_are_named():
    lstm = _model("lstm", {"hidden_size": 6})
    assert "LSTMBaseline" in fast.unsupported(lstm)
    with pytest.raises(ValueError, match="no fused path"):
        fast.forward(lstm, torch.zeros(1, 2, I, dtype=torch.float64))
    assert fast.unsupported(_model("ntm", NTM_TINY)) is None
    swapped = _model("dnc", DNC_TINY)
    swapped.output = torch.nn.Sequential(swapped.output)  # e.g. mann.multiseed's per-seed layers
    assert "DNC.output is a Sequential" in fast.unsupported(swapped)
    assert dispatch.choose(swapped, "auto").path == "reference"
    assert dispatch.choose(lstm, "auto").path == "reference"


# -- Seeds stacked (mann.multiseed's fold through the fused path) --------------------------------------------------


@pytest.mark.parametrize("name,overrides", [
    ("ntm", NTM_TINY),
    ("ntm", {**NTM_TINY, "controller": "feedforward", "read_heads": 2}),
    ("dnc", DNC_TINY),
    ("dnc-mds", {**DNC_TINY, "write_heads": 2}),
])
def test_stacked_seed_weights_give_each_block_its_own_model(name, overrides, kernels):
    """S models' weights stacked [S, ...] run S blocks of rows at once: block s gets model s's logits and every
    gradient model s gets alone (its weights, its input, its initial state)."""
    S = 3
    models = []
    for s in range(S):
        torch.manual_seed(10 + s)  # each "seed" its own weights
        models.append(build_model(name, make_model_config(name, overrides), I, O).double())
    names = fast.param_names(models[0])
    stacked = [torch.stack([m.get_parameter(n).detach() for m in models]).requires_grad_() for n in names]
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(B, T, I, dtype=torch.float64, generator=g).requires_grad_() for _ in range(S)]
    states = [_random_state(m, B) for m in models]
    folded_state = type(states[0])(*(
        tuple(torch.cat(parts) for parts in zip(*fields, strict=True)) if isinstance(fields[0], tuple)
        else torch.cat(fields) for fields in zip(*states, strict=True)))
    y = fast.forward(models[0], torch.cat(xs), folded_state, params=stacked).view(S, B, T, O)
    probe = torch.randn(y.shape, dtype=torch.float64, generator=g)
    g_stacked = torch.autograd.grad(y, stacked + xs + _leaves(states[0]) + _leaves(states[1]), probe)
    g_params, g_x = g_stacked[: len(names)], g_stacked[len(names) : len(names) + S]
    g_state1 = g_stacked[len(names) + S + len(_leaves(states[0])) :]
    for s, model in enumerate(models):
        y_own = fast.forward(model, xs[s], states[s])
        assert torch.allclose(y[s], y_own, rtol=TOL, atol=TOL), (name, s)
        own = torch.autograd.grad(y_own, [*(model.get_parameter(n) for n in names), xs[s], *_leaves(states[s])],
                                  probe[s])
        for n, a, b in zip(names, own[: len(names)], [gp[s] for gp in g_params], strict=True):
            assert torch.allclose(a, b, rtol=TOL, atol=TOL), (name, s, n)
        assert torch.allclose(own[len(names)], g_x[s], rtol=TOL, atol=TOL)
        if s == 1:  # the initial state's gradient reaches the right block
            for a, b in zip(own[len(names) + 1 :], g_state1, strict=True):
                assert torch.allclose(a, b, rtol=TOL, atol=TOL), name


def test_the_kernels_use_the_reference_constants():
    """Each eps and the softplus threshold is written twice, in mann.addressing (PyTorch's for softplus) and in
    mann/csrc: the same values, by name."""
    csrc = Path(native.__file__).parent / "csrc"
    found = {}
    for path in csrc.glob("*"):
        for name, value in re.findall(r"constexpr double (k\w+) = ([0-9.e+-]+);", path.read_text()):
            found.setdefault(name, set()).add(float(value))
    assert found["kContentEps"] == {addressing.CONTENT_EPS}
    assert found["kSharpenEps"] == {addressing.SHARPEN_EPS}
    assert found["kLinkEps"] == {addressing.LINK_EPS}
    (threshold,) = found["kSoftplusThreshold"]
    x = torch.tensor([threshold - 1e-3, threshold + 1e-3], dtype=torch.float64)
    assert F.softplus(x)[0] != x[0] and F.softplus(x)[1] == x[1]  # PyTorch's default threshold is the kernels'
