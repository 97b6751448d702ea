"""The models' contract (docs/architecture.md, "Models") and the numerics of NTM, DNC and the LSTM baseline."""

import numpy as np
import pytest
import torch
from torch import nn

from mann import addressing
from mann.config import ConfigError
from mann.dnc import DNCState, floored_mask
from mann.ntm import MEMORY_INIT_CONSTANT, NTMState
from mann.registry import MODELS, build_model, make_model_config

I, O = 6, 5  # input and output sizes used throughout

# Small sizes keep the suite fast; every registry name is also built once at its defaults (test_default_shapes).
TINY = {
    "ntm": {"memory_size": 8, "word_size": 4, "controller_size": 12},
    "dnc": {"memory_size": 6, "word_size": 4, "controller_size": 12, "read_heads": 2},
    "lstm": {"hidden_size": 12},
}


def tiny(name, **overrides):
    family = "dnc" if name.startswith("dnc") else name
    cfg = make_model_config(name, {**TINY[family], **overrides})
    return build_model(name, cfg, I, O)


def seeded(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return tiny(name, **overrides)


def tensors(tree):
    """Every tensor in a (nested) state."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for item in tree for t in tensors(item)]


# -- the contract -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_shapes(name):
    torch.manual_seed(0)
    model = build_model(name, make_model_config(name), I, O)
    x = torch.randn(3, 4, I)
    y = model(x)
    assert y.shape == (3, 4, O)
    state = model.initial_state(3)
    assert hasattr(state, "_fields")  # a NamedTuple
    y_t, state = model.step(x[:, 0], state)
    assert y_t.shape == (3, O)
    assert all(t.dtype == torch.float32 for t in tensors(state))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float64_forward_and_backward_are_finite(name):
    model = seeded(name).to(torch.float64)
    x = torch.randn(2, 6, I, dtype=torch.float64)
    state = model.initial_state(2)
    assert all(t.dtype == torch.float64 for t in tensors(state))
    y = model(x, state)
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
    y.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_state_fields():
    ntm = tiny("ntm", read_heads=2, write_heads=1)
    s = ntm.initial_state(3)
    assert isinstance(s, NTMState)
    assert s._fields == ("memory", "read_weights", "write_weights", "reads", "controller")
    assert s.memory.shape == (3, 8, 4) and s.read_weights.shape == (3, 2, 8) and s.write_weights.shape == (3, 1, 8)
    assert s.reads.shape == (3, 2, 4) and [t.shape for t in s.controller] == [(3, 12), (3, 12)]
    assert torch.allclose(s.read_weights.sum(-1), torch.ones(3, 2))

    dnc = tiny("dnc", write_heads=2)
    s = dnc.initial_state(3)
    assert isinstance(s, DNCState)
    assert s._fields == (
        "memory", "read_weights", "write_weights", "link", "precedence", "usage", "reads", "controller"
    )
    assert s.memory.shape == (3, 6, 4) and s.link.shape == (3, 2, 6, 6) and s.precedence.shape == (3, 2, 6)
    assert s.usage.shape == (3, 6) and s.reads.shape == (3, 2, 4) and s.write_weights.shape == (3, 2, 6)
    assert all((t == 0).all() for t in tensors(s))  # the DNC starts from an empty memory
    _, s = dnc.step(torch.randn(3, I), s)
    assert isinstance(s, DNCState) and torch.isfinite(s.memory).all() and (s.memory != 0).any()

    ffw = tiny("ntm", controller="feedforward")
    assert ffw.initial_state(2).controller == ()
    assert ffw(torch.randn(2, 3, I)).shape == (2, 3, O)


def test_lstm_step_matches_whole_sequence_and_ignores_memory_size():
    model = seeded("lstm", layers=2)
    x = torch.randn(2, 5, I)
    state = model.initial_state(2, memory_size=999)
    assert state.h.shape == (2, 2, 12)
    ys = []
    for t in range(5):
        y, state = model.step(x[:, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), model(x, memory_size=999))


def test_lstm_default_matches_ntm_parameter_count_on_copy():
    """The figures in mann/lstm.py's docstring, on the real copy task's sizes."""
    from mann.tasks import build_task

    task = build_task("copy")
    counts = {n: sum(p.numel() for p in build_model(n, make_model_config(n), task.input_size, task.output_size)
                     .parameters()) for n in ("ntm", "lstm")}
    assert counts == {"ntm": 62_936, "lstm": 63_848}


@pytest.mark.parametrize(
    "name, overrides, key",
    [
        ("ntm", {"shift_range": 4}, "model.shift_range"),  # 2k + 1 > N = 8
        ("ntm", {"memory_init": "zeros"}, "model.memory_init"),
        ("dnc", {"read_heads": 0}, "model.read_heads"),
        ("dnc-md", {"clip_value": -1}, "model.clip_value"),
        ("dnc-md", {"mask_min": 1.0}, "model.mask_min"),
        ("ntm", {"controller": "feedforward", "forget_bias": 1.0}, "model.forget_bias"),
        ("ntm", {"layer_init": "keras"}, "model.layer_init"),
        ("dnc-md", {"mask_min": -0.1}, "model.mask_min"),
        ("lstm", {"layers": 0}, "model.layers"),
    ],
)
def test_bad_config_names_the_key(name, overrides, key):
    family = "dnc" if name.startswith("dnc") else name
    with pytest.raises(ConfigError) as info:
        make_model_config(name, {**TINY[family], **overrides})
    assert info.value.key == key


# -- read vectors reach the controller ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, overrides", [("ntm", {}), ("ntm", {"controller": "feedforward"}), ("dnc", {})])
def test_output_depends_on_previous_reads(name, overrides):
    """d y_t / d r_{t-1} != 0: a public DNC never fed r_{t-1} back to its controller."""
    model = seeded(name, **overrides)
    x = torch.randn(2, 3, I)
    state = model.initial_state(2)
    for t in range(2):
        _, state = model.step(x[:, t], state)
    reads = state.reads.detach().requires_grad_()
    y, _ = model.step(x[:, 2], state._replace(reads=reads))
    (grad,) = torch.autograd.grad(y.sum(), reads)
    assert grad.abs().min() > 0  # every component of every read vector matters


# -- the DNC variants ----------------------------------------------------------------------------------------------


def dnc_pair(**flags):
    """A plain DNC and a variant sharing all of its weights (the variant's extra interface rows come last)."""
    plain = seeded("dnc")
    variant = seeded("dnc", seed=1, **flags)
    plain_params = dict(plain.named_parameters())
    with torch.no_grad():
        for key, p in variant.named_parameters():
            p[: plain_params[key].shape[0]] = plain_params[key]
    return plain, variant


@pytest.mark.parametrize("flags", [{"masking": True}, {"deallocation": True}, {"sharpness": True}])
def test_each_variant_flag_changes_the_output(flags):
    # float64, so that a real change (masks at random init only move the output by ~1e-5) stands far above
    # rounding differences between the two interface layers' matmuls (~1e-16).
    plain, variant = (m.to(torch.float64) for m in dnc_pair(**flags))
    x = torch.randn(2, 6, I, dtype=torch.float64)
    with torch.no_grad():
        y_plain, y_variant = plain(x), variant(x)
    assert (y_plain - y_variant).abs().max() > 1e-9


def test_variant_with_no_flags_equals_plain():
    """The control for the test above: sharing weights this way reproduces the plain DNC exactly."""
    plain, same = (m.to(torch.float64) for m in dnc_pair())
    x = torch.randn(2, 6, I, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), same(x), rtol=0, atol=1e-12)


def _numpy_masked_content(memory, keys, beta, mask_logits, mask_min, eps=1e-6):
    """Csordás & Schmidhuber's masked content look-up in NumPy, from their description and code: the mask
    m = sigmoid(z) (1 - mask_min) + mask_min multiplies key and memory, D = (k m).(M_i m) / (|k m| |M_i m| + eps),
    softmax_i(beta D). memory [B, N, W]; keys, mask_logits [B, H, W]; beta [B, H] -> [B, H, N]."""
    m = 1 / (1 + np.exp(-mask_logits)) * (1 - mask_min) + mask_min
    km = keys * m  # [B, H, W]
    Mm = memory[:, None, :, :] * m[:, :, None, :]  # [B, H, N, W]
    dot = (Mm * km[:, :, None, :]).sum(-1)
    D = dot / (np.linalg.norm(km, axis=-1)[..., None] * np.linalg.norm(Mm, axis=-1) + eps)
    z = beta[..., None] * D
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


@pytest.mark.parametrize("mask_min", [0.0, 0.1, 0.6])
def test_masked_content_lookup_with_a_mask_floor_matches_numpy(mask_min):
    g = torch.Generator().manual_seed(3)
    memory, keys, z = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in
                       ((2, 7, 5), (2, 3, 5), (2, 3, 5)))
    beta = 1 + 3 * torch.rand(2, 3, generator=g, dtype=torch.float64)
    mask = floored_mask(z, mask_min)
    assert mask.min() >= mask_min and mask.max() < 1
    ours = addressing.content_weights(memory, keys, beta, mask=mask)
    expected = _numpy_masked_content(memory.numpy(), keys.numpy(), beta.numpy(), z.numpy(), mask_min)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["dnc-md", "dnc-mds"])
def test_dnc_step_floors_its_read_and_write_masks_at_mask_min(name, monkeypatch):
    """The masks DNC.step hands to content addressing are mask_min + (1 - mask_min) sigmoid of their interface
    parts (recomputed here in NumPy from the interface layer's output), for the write and the read look-up."""
    mask_min = 0.25
    model = seeded(name, mask_min=mask_min).double()
    cfg, R, Hw, W = model.cfg, model.cfg.read_heads, model.cfg.write_heads, model.cfg.word_size
    raws, masks = [], []
    model.interface.register_forward_hook(lambda module, args, out: raws.append(out.detach()))
    original = addressing.content_weights
    monkeypatch.setattr(addressing, "content_weights",
                        lambda m, k, b, mask=None: masks.append(mask.detach()) or original(m, k, b, mask=mask))
    model.step(torch.randn(2, I, dtype=torch.float64), model.initial_state(2))
    xi = np.clip(raws[0].numpy(), -cfg.clip_value, cfg.clip_value)
    start = sum(model.interface_sizes[:10])  # the masks follow the paper's ten parts: read masks, write masks
    z_read, z_write = xi[:, start : start + R * W], xi[:, start + R * W : start + (R + Hw) * W]
    floor = lambda z: mask_min + (1 - mask_min) / (1 + np.exp(-z))  # noqa: E731
    write_mask, read_mask = masks  # the write look-up (on M_{t-1}) runs before the read look-up (on M_t)
    np.testing.assert_allclose(write_mask.numpy().reshape(2, -1), floor(z_write), rtol=1e-12)
    np.testing.assert_allclose(read_mask.numpy().reshape(2, -1), floor(z_read), rtol=1e-12)
    assert write_mask.min() >= mask_min


def test_mask_min_changes_a_masked_dnc_and_nothing_else():
    x = torch.randn(2, 5, I)
    outputs = {}
    for name in ("dnc", "dnc-md"):
        for mm in (0.0, 0.3):
            with torch.no_grad():
                outputs[name, mm] = seeded(name, mask_min=mm)(x)
    assert torch.equal(outputs["dnc", 0.0], outputs["dnc", 0.3])  # no masks: nothing to floor
    assert not torch.allclose(outputs["dnc-md", 0.0], outputs["dnc-md", 0.3])


def test_registry_presets_set_the_flags():
    flags = {n: tuple(getattr(make_model_config(n), f) for f in ("masking", "deallocation", "sharpness"))
             for n in ("dnc", "dnc-md", "dnc-ms", "dnc-mds")}
    assert flags == {"dnc": (False,) * 3, "dnc-md": (True, True, False), "dnc-ms": (True, False, True),
                     "dnc-mds": (True, True, True)}


# -- memory initialisation and larger memories ---------------------------------------------------------------------


def test_memory_init_schemes():
    constant = seeded("ntm", memory_init="constant")
    M = constant.initial_state(3).memory
    assert (M == torch.tensor(MEMORY_INIT_CONSTANT)).all() and MEMORY_INIT_CONSTANT == 1e-6
    assert not hasattr(constant, "init_memory")

    learned = seeded("ntm", memory_init="learned")
    assert isinstance(learned.init_memory, nn.Parameter)
    assert any(p is learned.init_memory for p in learned.parameters())
    learned(torch.randn(2, 3, I)).sum().backward()
    assert learned.init_memory.grad.abs().sum() > 0
    M = learned.initial_state(2).memory
    assert torch.equal(M[0], M[1]) and M[0].std() > 0  # one learned memory for every sequence, not constant

    random = seeded("ntm", memory_init="random")
    assert not hasattr(random, "init_memory")
    torch.manual_seed(5)
    a = random.initial_state(2).memory
    b = random.initial_state(2).memory
    torch.manual_seed(5)
    a_again = random.initial_state(2).memory
    assert not torch.equal(a, b) and not torch.equal(a[0], a[1])  # differs per call and per sequence
    assert torch.equal(a, a_again)  # and follows the seed


# What each scheme initialises M_0 to and whether training moves it. Collier & Beel's code (ntm.py, zero_state):
# "constant" is tf.get_variable(init 1e-6), "learned" tanh of a Glorot-uniform 1 -> N*W layer's weights, "random"
# tanh(tf.get_variable(init N(0, 0.5^2))); every tf.get_variable is trainable and run_tasks.py's optimizer updates
# all trainable variables. Rows: scheme -> (trained, tanh applied to the parameter, parameter's initial values).
INIT_SCHEMES = {
    "constant": (False, None, None),
    "random": (False, None, None),
    "learned": (True, True, "glorot"),  # U(+-sqrt(6 / (1 + N W)))
    "constant_trained": (True, False, "1e-6"),
    "random_trained": (True, True, "normal 0.5"),
}


@pytest.mark.parametrize("init", sorted(INIT_SCHEMES))
def test_each_memory_init_scheme_initialises_and_trains_what_collier_and_beel_do(init):
    trained, tanh, start = INIT_SCHEMES[init]
    model = seeded("ntm", memory_init=init, memory_size=64, word_size=20)
    N, W = 64, 20
    params = dict(model.named_parameters())
    # the initial reads and weightings are learned in every scheme: r_0 = tanh(p), w_0 = softmax(q)
    assert {"init_reads", "init_weight_logits"} <= set(params)
    state = model.initial_state(3)
    torch.testing.assert_close(state.reads[0], torch.tanh(model.init_reads))
    torch.testing.assert_close(state.read_weights[0], torch.softmax(model.init_weight_logits, -1)[:1])
    assert ("init_memory" in params) == trained
    if trained:
        P = model.init_memory
        start_values = P.detach().clone()
        assert P.shape == (N, W)
        torch.testing.assert_close(state.memory, (torch.tanh(P) if tanh else P).expand(3, N, W))
        if start == "1e-6":
            assert (P == MEMORY_INIT_CONSTANT).all()
        elif start == "glorot":
            bound = (6 / (1 + N * W)) ** 0.5
            assert P.abs().max() <= bound and P.abs().max() > 0.9 * bound and abs(P.mean()) < 0.1 * bound
        else:
            assert abs(P.std().item() - 0.5) < 0.02 and abs(P.mean().item()) < 0.02  # 1280 draws of N(0, 0.25)
        with torch.no_grad():  # tanh(1e-6) is 1e-6 to float precision: whether tanh applies shows at 2
            P.fill_(2.0)
        assert (model.initial_state(1).memory == (torch.tanh(torch.tensor(2.0)) if tanh else 2.0)).all()
        with torch.no_grad():
            P.copy_(start_values)
    # one Adam step: the memory a trained scheme starts from moves; an untrained one stays as it was
    before = model.initial_state(1).memory.detach().clone() if init != "random" else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, I)).square().sum().backward()
    optimizer.step()
    if init == "random":
        return
    after = model.initial_state(1).memory
    assert torch.equal(before, after) != trained
    if init == "constant":
        assert (after == MEMORY_INIT_CONSTANT).all()


@pytest.mark.parametrize("init", sorted(INIT_SCHEMES))
def test_ntm_runs_with_a_larger_memory(init):
    model = seeded("ntm", memory_init=init)
    s = model.initial_state(2, memory_size=20)
    trained = model.initial_state(2)
    assert s.memory.shape == (2, 20, 4) and s.read_weights.shape == (2, 1, 20) and s.write_weights.shape == (2, 1, 20)
    # The trained slots start as in training; the extra ones get no initial weight.
    torch.testing.assert_close(s.read_weights[..., :8], trained.read_weights)
    assert (s.read_weights[..., 8:] == 0).all() and (s.write_weights[..., 8:] == 0).all()
    if init != "random":
        torch.testing.assert_close(s.memory[:, :8], trained.memory)
        assert (s.memory[:, 8:] == torch.tensor(MEMORY_INIT_CONSTANT)).all()
    y = model(torch.randn(2, 5, I), memory_size=20)
    assert y.shape == (2, 5, O) and torch.isfinite(y).all()
    with pytest.raises(ConfigError, match="memory_size"):
        model.initial_state(2, memory_size=4)


def test_dnc_runs_with_a_larger_memory():
    model = seeded("dnc-mds")
    x = torch.randn(2, 5, I)
    assert model.initial_state(2, memory_size=20).link.shape == (2, 1, 20, 20)
    y = model(x, memory_size=20)
    assert y.shape == (2, 5, O) and torch.isfinite(y).all()
    assert not torch.allclose(y, model(x))  # the memory size really changed


# -- gradcheck of one step -----------------------------------------------------------------------------------------


def gradcheck_step(model, state_keys, steps=3):
    """gradcheck of one step w.r.t. x_t and the named state tensors, from a state reached after a few steps."""
    model = model.to(torch.float64)
    x = torch.randn(2, steps + 1, I, dtype=torch.float64)
    state = model.initial_state(2)
    with torch.no_grad():
        for t in range(steps):
            _, state = model.step(x[:, t], state)
    inputs = [x[:, steps].clone().requires_grad_()] + [
        getattr(state, k).clone().requires_grad_() for k in state_keys
    ]

    def one_step(x_t, *values):
        y, new = model.step(x_t, state._replace(**dict(zip(state_keys, values, strict=True))))
        return y, new.memory, new.read_weights, new.reads

    assert torch.autograd.gradcheck(one_step, inputs)


def test_gradcheck_ntm_step():
    torch.manual_seed(0)
    cfg = make_model_config("ntm", {"memory_size": 5, "word_size": 3, "controller_size": 4, "read_heads": 2})
    gradcheck_step(build_model("ntm", cfg, I, O), ("memory", "read_weights", "write_weights", "reads"))


@pytest.mark.parametrize("name", ["dnc", "dnc-mds"])
def test_gradcheck_dnc_step(name):
    torch.manual_seed(0)
    cfg = make_model_config(name, {"memory_size": 5, "word_size": 3, "controller_size": 6, "read_heads": 2})
    keys = ("memory", "read_weights", "write_weights", "link", "precedence", "usage", "reads")
    gradcheck_step(build_model(name, cfg, I, O), keys)


# -- devices -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda(name):
    model = seeded(name).cuda()
    state = model.initial_state(2, memory_size=None)
    assert all(t.is_cuda for t in tensors(state))
    y = model(torch.randn(2, 4, I, device="cuda"))
    assert y.is_cuda and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["ntm", "dnc-mds", "lstm"])
def test_forget_bias_raises_the_forget_gate_bias_at_initialisation_and_nothing_else(name):
    plain = dict(seeded(name).named_parameters())
    biased = seeded(name, forget_bias=1.0)
    H = 12  # every TINY controller / LSTM has 12 units
    for n, p in biased.named_parameters():
        if n.rsplit(".", 1)[-1].startswith("bias_ih"):
            torch.testing.assert_close(p[H : 2 * H], plain[n][H : 2 * H] + 1.0, rtol=0, atol=1e-7)
            assert torch.equal(p[:H], plain[n][:H]) and torch.equal(p[2 * H :], plain[n][2 * H :]), n
        else:
            assert torch.equal(p, plain[n]), n
    assert any(n.rsplit(".", 1)[-1].startswith("bias_ih") for n in plain)


def test_forget_bias_is_tensorflows_constant_added_to_the_forget_gate():
    """TF's BasicLSTMCell computes c = sigmoid(f + forget_bias) c_prev + ...: an nn.LSTMCell whose forget bias was
    raised by forget_bias at initialisation gives the same h and c."""
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4).double()
    raised = nn.LSTMCell(3, 4).double()
    raised.load_state_dict(cell.state_dict())
    from mann.lstm import add_forget_bias

    add_forget_bias(raised, 1.0)
    x, h, c = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64), torch.randn(
        2, 4, dtype=torch.float64)
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    i, f, g, o = gates.chunk(4, 1)
    c_tf = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(g)
    h_tf = torch.sigmoid(o) * torch.tanh(c_tf)
    h_ours, c_ours = raised(x, (h, c))
    torch.testing.assert_close(c_ours, c_tf, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_ours, h_tf, rtol=1e-12, atol=1e-12)


def test_tensorflow_layer_init_draws_collier_and_beels_starting_weights():
    """layer_init tensorflow: interface and output kernels from a normal with std 1/sqrt(fan_in) cut at two std
    (std of the cut normal 0.880/sqrt(fan_in)); the LSTM kernel Glorot-uniform over TF's one [in + H, 4H]
    matrix (std limit/sqrt(3)); every bias 0 but the forget gate's, which is forget_bias."""
    torch.manual_seed(0)
    model = build_model("ntm", make_model_config("ntm", {"layer_init": "tensorflow", "forget_bias": 1.0}), 9, 8)
    for layer in (model.interface, model.output):
        std = 1 / np.sqrt(layer.in_features)
        w = layer.weight.detach().numpy()
        assert np.abs(w).max() <= 2 * std
        assert abs(w.std() / (0.8796 * std) - 1) < 0.05
        assert not layer.bias.detach().any()
    cell = model.controller
    H = cell.hidden_size
    limit = np.sqrt(6 / (cell.input_size + H + 4 * H))
    kernel = torch.cat([cell.weight_ih, cell.weight_hh], 1).detach().numpy()
    assert np.abs(kernel).max() <= limit
    assert abs(kernel.std() / (limit / np.sqrt(3)) - 1) < 0.05
    forget = np.zeros(4 * H)
    forget[H : 2 * H] = 1.0
    np.testing.assert_array_equal((cell.bias_ih + cell.bias_hh).detach().numpy(), forget)


def test_layer_init_pytorch_is_the_default_and_changes_nothing_else():
    torch.manual_seed(0)
    default = tiny("ntm")
    torch.manual_seed(0)
    explicit = tiny("ntm", layer_init="pytorch")
    for (n, p), q in zip(default.named_parameters(), explicit.parameters(), strict=True):
        assert torch.equal(p, q), n
    ff = tiny("ntm", controller="feedforward", layer_init="tensorflow")
    assert not ff.controller.bias.detach().any()
