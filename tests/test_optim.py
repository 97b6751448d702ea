"""mann.optim: the flat-buffer optimizers make torch.optim's updates, and keep its state_dict layout."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from mann.optim import Adam, FlatParams, RMSprop, bias_mask, grad_norm

SETTINGS = {
    "adam": (lambda flat: Adam(flat, lr=3e-3, eps=1e-8),
             lambda ps: torch.optim.Adam(ps, lr=3e-3, eps=1e-8)),
    # Graves 2013's RMSProp, as mann.train's default
    "rmsprop-graves": (lambda flat: RMSprop(flat, lr=1e-3, alpha=0.95, eps=1e-8, momentum=0.9, centered=True),
                       lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.95, eps=1e-8, momentum=0.9, centered=True)),
    "rmsprop-plain": (lambda flat: RMSprop(flat, lr=1e-3, alpha=0.99),
                      lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.99)),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(5, 7)
        self.out = nn.Linear(7, 3)
        self.unused = nn.Parameter(torch.randn(4))  # no gradient ever: torch.optim skips it, we must not move it

    def forward(self, x):
        h, _ = self.cell(x)
        return self.out(h)


def pair(dtype, seed=0):
    torch.manual_seed(seed)
    a = Net().to(dtype)
    b = Net().to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def train(model, opt, zero, steps, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 5, generator=g, dtype=dtype)
        zero()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_flat_update_is_torch_optims(name, dtype):
    ours, theirs = SETTINGS[name]
    a, b = pair(dtype)
    flat = FlatParams(list(a.parameters()))
    opt_a, opt_b = ours(flat), theirs(list(b.parameters()))
    train(a, opt_a, opt_a.zero_grad, 12, dtype)
    train(b, opt_b, lambda: opt_b.zero_grad(set_to_none=True), 12, dtype)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n  # element for element the same arithmetic
    assert not torch.equal(a.out.weight, pair(dtype)[0].out.weight)  # and it did train
    assert torch.equal(a.unused, pair(dtype)[0].unused)


def test_parameters_become_views_of_the_flat_buffer():
    a, _ = pair(torch.float64)
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    ids = [id(p) for p in a.parameters()]
    flat = FlatParams(list(a.parameters()))
    assert [id(p) for p in a.parameters()] == ids  # the same Parameter objects
    for n, p in a.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad
    assert flat.data.numel() == sum(p.numel() for p in before.values())
    flat.data.add_(1.0)
    assert torch.equal(a.out.bias, before["out.bias"] + 1.0)
    a.load_state_dict({n: torch.zeros_like(v) for n, v in before.items()})  # copies into the views
    assert flat.data.abs().sum() == 0
    a(torch.ones(2, 5, dtype=torch.float64)).sum().backward()
    position = list(dict(a.named_parameters())).index("out.bias")
    assert a.out.bias.grad is flat.grad_views[position]  # autograd accumulated into the view
    assert flat.grad.abs().sum() > 0


def test_gathered_gradients_are_the_assigned_ones():
    a, _ = pair(torch.float64)
    flat = FlatParams(list(a.parameters()))
    flat.grad.fill_(5.0)
    grads = [torch.full_like(p, float(i)) for i, p in enumerate(a.parameters())]
    for p, g in zip(a.parameters(), grads, strict=True):
        p.grad = g
    a.cell.bias_hh.grad = None
    flat.gather_grads()
    for name, (p, g, view) in zip(dict(a.named_parameters()), zip(a.parameters(), grads, flat.grad_views,
                                                                   strict=True), strict=True):
        assert p.grad is view
        assert torch.equal(view, torch.zeros_like(g) if name == "cell.bias_hh" else g), name


def test_grad_norm_and_clipping_match_torch():
    a, b = pair(torch.float64)
    flat = FlatParams(list(a.parameters()))
    x = torch.randn(6, 5, dtype=torch.float64)
    for model in (a, b):
        model(x).pow(2).sum().backward()
    norm = grad_norm(flat)
    expected = torch.nn.utils.get_total_norm([p.grad for p in b.parameters() if p.grad is not None])
    torch.testing.assert_close(norm, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_state_dicts_move_between_torch_optim_and_ours(name):
    """A checkpoint's optimizer state written by torch.optim continues here exactly, and ours loads into it."""
    ours, theirs = SETTINGS[name]
    dtype = torch.float64
    a, b = pair(dtype)
    opt_b = theirs(list(b.parameters()))
    train(b, opt_b, lambda: opt_b.zero_grad(set_to_none=True), 5, dtype)
    a.load_state_dict(b.state_dict())
    flat = FlatParams(list(a.parameters()))
    opt_a = ours(flat)
    opt_a.load_state_dict(opt_b.state_dict())
    train(a, opt_a, opt_a.zero_grad, 4, dtype, seed=2)
    train(b, opt_b, lambda: opt_b.zero_grad(set_to_none=True), 4, dtype, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)

    saved = opt_a.state_dict()
    c, _ = pair(dtype)
    c.load_state_dict(a.state_dict())
    opt_c = theirs(list(c.parameters()))
    opt_c.load_state_dict(saved)
    train(a, opt_a, opt_a.zero_grad, 3, dtype, seed=3)
    train(c, opt_c, lambda: opt_c.zero_grad(set_to_none=True), 3, dtype, seed=3)
    for (n, pa), pc in zip(a.named_parameters(), c.parameters(), strict=True):
        if n != "unused":  # torch.optim steps the zero moments we save for it (a no-op update); we do too
            assert torch.equal(pa, pc), n


def test_a_fresh_state_round_trips_and_a_wrong_one_is_refused():
    a, _ = pair(torch.float64)
    flat = FlatParams(list(a.parameters()))
    opt = Adam(flat, lr=1e-3)
    opt.load_state_dict(torch.optim.Adam(list(pair(torch.float64)[1].parameters())).state_dict())  # empty state
    assert float(opt.step_count) == 0 and opt.state["exp_avg"].abs().sum() == 0
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg of parameter 0: expected shape"):
        opt.load_state_dict(saved)
    with pytest.raises(ValueError, match="expected one group of"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})


def test_a_model_moved_after_its_optimizer_is_refused_at_the_next_step():
    a, _ = pair(torch.float32)
    opt = Adam(FlatParams(list(a.parameters())), lr=1e-3)
    a.double()
    a(torch.ones(2, 5, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match="no longer live in the optimizer's flat buffer"):
        opt.step()


def test_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype and device"):
        FlatParams([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))])


def test_training_imports_no_dynamo():
    """torch.optim's wrappers import torch._dynamo (~1 CPU s in every trial process); a run with ours does not."""
    code = (
        "import sys, mann.train as T\n"
        "for opt in ('adam', 'rmsprop'):\n"
        "    cfg = T.make_train_config('ntm', 'copy', {'optimizer': opt, 'max_steps': 4, 'eval_every': 2,\n"
        "        'model.controller_size': 16, 'model.memory_size': 8, 'model.word_size': 4, 'task.max_length': 2})\n"
        "    assert T.fit(cfg).status == 'completed'\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- weight decay ---------------------------------------------------------------------------------------------------

DECAY_SETTINGS = {  # (ours, torch.optim) with weight decay; Csordás & Schmidhuber's RMSProp is the second
    "adam": (lambda flat, **kw: Adam(flat, lr=3e-3, eps=1e-8, **kw),
             lambda groups, wd: torch.optim.Adam(groups, lr=3e-3, eps=1e-8, weight_decay=wd)),
    "rmsprop-csordas": (lambda flat, **kw: RMSprop(flat, lr=1e-3, alpha=0.99, eps=1e-10, momentum=0.9, **kw),
                        lambda groups, wd: torch.optim.RMSprop(groups, lr=1e-3, alpha=0.99, eps=1e-10, momentum=0.9,
                                                               weight_decay=wd)),
    "rmsprop-graves": (lambda flat, **kw: RMSprop(flat, lr=1e-3, alpha=0.95, eps=1e-8, momentum=0.9, centered=True,
                                                  **kw),
                       lambda groups, wd: torch.optim.RMSprop(groups, lr=1e-3, alpha=0.95, eps=1e-8, momentum=0.9,
                                                              centered=True, weight_decay=wd)),
}
WD = 0.05  # large enough that a decay on the wrong numbers shows within a few steps


def used(model):
    """(name, parameter) pairs that get a gradient (torch.optim skips the others, weight decay included)."""
    return [(n, p) for n, p in model.named_parameters() if n != "unused"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(DECAY_SETTINGS))
def test_weight_decay_on_every_parameter_is_torch_optims(name, dtype):
    ours, theirs = DECAY_SETTINGS[name]
    a, b = pair(dtype)
    opt_a = ours(FlatParams([p for _, p in used(a)]), weight_decay=WD)
    opt_b = theirs([p for _, p in used(b)], WD)
    train(a, opt_a, opt_a.zero_grad, 10, dtype)
    train(b, opt_b, lambda: opt_b.zero_grad(set_to_none=True), 10, dtype)
    for (n, pa), (_, pb) in zip(used(a), used(b), strict=True):
        assert torch.equal(pa, pb), n
    assert opt_a.state_dict()["param_groups"][0]["weight_decay"] == WD


@pytest.mark.parametrize("name", list(DECAY_SETTINGS))
def test_weight_decay_on_weights_only_is_torch_optims_two_groups(name):
    """Csordás & Schmidhuber's setup: one group of weights with weight decay, one of biases without."""
    ours, theirs = DECAY_SETTINGS[name]
    dtype = torch.float64
    a, b = pair(dtype)
    flat = FlatParams([p for _, p in used(a)])
    mask = bias_mask(flat, [n for n, _ in used(a)])
    opt_a = ours(flat, weight_decay=WD, decay=mask)
    weights = [p for n, p in used(b) if "bias" not in n]
    biases = [p for n, p in used(b) if "bias" in n]
    opt_b = theirs([{"params": weights}, {"params": biases, "weight_decay": 0.0}], WD)
    train(a, opt_a, opt_a.zero_grad, 10, dtype)
    train(b, opt_b, lambda: opt_b.zero_grad(set_to_none=True), 10, dtype)
    for (n, pa), (_, pb) in zip(used(a), used(b), strict=True):
        assert torch.equal(pa, pb), n
    # and it is not the same as decaying everything
    c, _ = pair(dtype)
    opt_c = ours(FlatParams([p for _, p in used(c)]), weight_decay=WD)
    train(c, opt_c, opt_c.zero_grad, 10, dtype)
    assert not torch.equal(c.out.bias, a.out.bias) and not torch.equal(c.out.weight, a.out.weight)


def test_bias_mask_spares_exactly_the_biases():
    a, _ = pair(torch.float64)
    named = used(a)
    flat = FlatParams([p for _, p in named])
    mask = bias_mask(flat, [n for n, _ in named])
    for (n, _), view in zip(named, flat.split(mask), strict=True):
        assert (view == (0.0 if n in ("cell.bias_ih", "cell.bias_hh", "out.bias") else 1.0)).all(), n
    with pytest.raises(ValueError, match="names for"):
        bias_mask(flat, ["x"])


def test_training_config_builds_the_decay_of_its_fields():
    from mann.config import ConfigError
    from mann.train import _Run, make_train_config

    tiny = {"model.controller_size": 8, "model.memory_size": 6, "model.word_size": 4, "model.read_heads": 1,
            "task.max_items": 3}
    run = _Run(make_train_config("dnc-md", "associative_recall", {**tiny, "weight_decay": 1e-5}))
    names = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert run.optimizer.weight_decay == 1e-5
    for name, view in zip(names, run.flat.split(run.optimizer.decay), strict=True):
        assert (view == (0.0 if ".bias" in name else 1.0)).all(), name
    every = _Run(make_train_config("dnc", "associative_recall", {**tiny, "weight_decay": 1e-5, "decay_biases": True}))
    assert every.optimizer.decay is None and every.optimizer.weight_decay == 1e-5
    assert _Run(make_train_config("dnc", "associative_recall", tiny)).optimizer.weight_decay == 0.0
    with pytest.raises(ConfigError, match="weight_decay"):
        make_train_config("dnc", "associative_recall", {"weight_decay": -1e-5})
