"""Optimizers on one flat buffer: every trainable weight a view of one tensor, every gradient a view of another.

A MANN's training step is tiny, and torch.optim's per-parameter loop is a large part of it: on this project's
models (8-10 weight tensors, 8k-170k numbers) an update (zero, norm, clip, step) costs 0.35-0.65 ms on one CPU
thread with torch.optim, a fifth of a small NTM's whole step, because it runs several small kernels per tensor.
On one flat buffer the same update is a few kernels in all: 0.06-0.34 ms (bench/optim.py).

The arithmetic is torch.optim's own: ``step`` calls its functional ``adam``/``rmsprop`` on the flat tensors,
so the update is element for element the one ``torch.optim.Adam``/``RMSprop`` makes (tests/test_optim.py).
What is ours is only the bookkeeping, and not subclassing ``torch.optim.Optimizer`` has a second benefit:
its wrappers import ``torch._dynamo`` on first use (torch 2.13), ~0.7-1.2 CPU s in every trial process.

``state_dict`` uses torch.optim's layout (per-parameter moments, one param group), so checkpoints written
with ``torch.optim`` load here and the other way round.

Weight decay (L2: ``weight_decay * w`` added to the gradient before the update, torch.optim's ``weight_decay``)
applies to every parameter, or only where a 0/1 mask over the flat buffer says (``decay``): Csordás & Schmidhuber
decay weights but not biases, which torch.optim expresses as two parameter groups and this as one mask, with the
same arithmetic (tests/test_optim.py). One difference: torch.optim skips a parameter that got no gradient at all,
while here it is decayed like the rest (every parameter of mann's models gets a gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.rmsprop import rmsprop


class FlatParams:
    """Trainable parameters re-pointed at views of one flat tensor; their ``.grad`` at views of another.

    params: tensors of one dtype and device, the model already moved: a later ``model.to(...)`` would give the
    parameters new storage, and the optimizer would update a buffer nothing reads. Autograd accumulates into an existing
    ``.grad`` in place, so after ``backward`` the gradients are in ``grad`` with no copy. Code that assigns a
    parameter's ``.grad`` itself (mann.multiseed hands each seed a slice of its stacked gradient) is fine:
    ``gather_grads`` copies such gradients in and re-points ``.grad`` at the view.
    """

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        if not self.params:
            raise ValueError("no trainable parameters")
        first = self.params[0]
        for p in self.params[1:]:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"parameters of one dtype and device expected, got {first.dtype} on {first.device} "
                                 f"and {p.dtype} on {p.device}")
        with torch.no_grad():
            self.data = torch.cat([p.detach().reshape(-1) for p in self.params])  # [P]
        self.grad = torch.zeros_like(self.data)  # [P]
        self.param_views = self.split(self.data)
        self.grad_views = self.split(self.grad)
        for p, view in zip(self.params, self.param_views, strict=True):
            p.data = view  # the parameter keeps its identity (autograd, state_dict); its storage is now ours
        self.point_grads()

    def split(self, flat: Tensor) -> list[Tensor]:
        """flat: [P] -> one view per parameter, in its shape."""
        return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in self.params]), self.params,
                                                  strict=True)]

    def point_grads(self) -> None:
        for p, view in zip(self.params, self.grad_views, strict=True):
            p.grad = view

    def zero_grad(self) -> None:
        """Zero every gradient (one kernel), and re-point any ``.grad`` that was replaced or cleared."""
        self.grad.zero_()
        self.point_grads()

    def gather_grads(self) -> None:
        """Make ``grad`` hold every parameter's current ``.grad`` (None counts as zero)."""
        if self.params[0].data_ptr() != self.param_views[0].data_ptr():
            raise RuntimeError("the parameters no longer live in the optimizer's flat buffer (was the model moved "
                               "with .to() after its optimizer was built?)")
        for p, view in zip(self.params, self.grad_views, strict=True):
            g = p.grad
            if g is view:
                continue
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
            p.grad = view


def grad_norm(flat: FlatParams) -> Tensor:
    """L2 norm of the whole gradient (0-d), as ``torch.nn.utils.get_total_norm`` of the parameters' gradients, in
    one reduction. Call after ``gather_grads`` where a caller may have assigned ``.grad`` itself."""
    return torch.linalg.vector_norm(flat.grad)


def _moments(flat: FlatParams, state: dict, names: Sequence[str]) -> dict[str, Tensor]:
    """Per-parameter moments of a torch.optim state (``state[i][name]``) laid into flat buffers; zeros where the
    state holds none (torch.optim's state before the first step). ValueError if a moment does not fit."""
    out = {}
    for name in names:
        buffer = torch.zeros_like(flat.data)
        for i, (view, p) in enumerate(zip(flat.split(buffer), flat.params, strict=True)):
            entry = state.get(i, {})
            if name in entry:
                value = entry[name]
                if not isinstance(value, Tensor) or value.shape != p.shape:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"optimizer state {name} of parameter {i}: expected shape {tuple(p.shape)}, "
                                     f"got {shape}")
                view.copy_(value)
        out[name] = buffer
    return out


def bias_mask(flat: FlatParams, names: Sequence[str]) -> Tensor:
    """A [P] mask over the flat buffer: 1 for weights, 0 for biases (a name whose last part starts with ``bias``:
    nn.Linear's ``bias``, nn.LSTMCell's ``bias_ih``/``bias_hh``). ``names``: the parameters' names, in order."""
    if len(names) != len(flat.params):
        raise ValueError(f"{len(names)} names for {len(flat.params)} parameters")
    mask = torch.ones_like(flat.data)
    for name, view in zip(names, flat.split(mask), strict=True):
        if name.rsplit(".", 1)[-1].startswith("bias"):
            view.zero_()
    return mask


class _FlatOptimizer:
    """What Adam and RMSprop share: the step counter, zero_grad, weight decay, and torch.optim's state_dict layout."""

    moments: tuple[str, ...] = ()
    hyperparameters: dict[str, Any] = {}  # torch.optim's param-group entries, for state_dict

    def __init__(self, flat: FlatParams, weight_decay: float = 0.0, decay: Tensor | None = None):
        """``weight_decay``: the L2 coefficient; ``decay``: None (every parameter) or a [P] 0/1 mask of the
        numbers it applies to (:func:`bias_mask`)."""
        if decay is not None and decay.shape != flat.data.shape:
            raise ValueError(f"decay mask of shape {tuple(decay.shape)}, expected {tuple(flat.data.shape)}")
        self.weight_decay, self.decay = weight_decay, decay
        self.flat = flat
        # torch.optim keeps a float32 step tensor per parameter on the CPU; one serves the flat buffer
        self.step_count = torch.zeros((), dtype=torch.float32)
        self.state = {name: torch.zeros_like(flat.data) for name in self.moments}

    def zero_grad(self) -> None:
        self.flat.zero_grad()

    def _update(self) -> None:
        raise NotImplementedError

    def _grad_and_decay(self) -> tuple[Tensor, float]:
        """(gradient, weight_decay) to hand torch.optim's functional update. With a mask the decay is added here,
        as torch.optim adds it (``grad.add(param, alpha=weight_decay)``), to the masked numbers only."""
        grad = self.flat.grad
        if self.decay is None or self.weight_decay == 0:
            return grad, self.weight_decay
        return grad.add(self.flat.data * self.decay, alpha=self.weight_decay), 0.0

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameters' current gradients."""
        self.flat.gather_grads()
        self._update()

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: {"state": {i: {"step", moments...}}, "param_groups": [{..., "params": [0..n)}]}."""
        views = {name: self.flat.split(buffer) for name, buffer in self.state.items()}
        state = {i: {"step": self.step_count.clone(), **{name: views[name][i].clone() for name in self.moments}}
                 for i in range(len(self.flat.params))}
        group = {**self.hyperparameters, "params": list(range(len(self.flat.params)))}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Moments and step from a state_dict in torch.optim's layout (ours or torch.optim's own).

        The hyperparameters stay the run's (its config is the truth), unlike torch.optim, which takes the saved
        group's. ValueError, KeyError or TypeError when the state does not fit these parameters.
        """
        groups, state = saved["param_groups"], saved["state"]
        n = len(self.flat.params)
        if len(groups) != 1 or len(groups[0]["params"]) != n:
            counts = [len(g["params"]) for g in groups]
            raise ValueError(f"optimizer state for parameter groups of sizes {counts}, expected one group of {n}")
        ids = list(groups[0]["params"])
        state = {position: state[i] for position, i in enumerate(ids) if i in state}
        steps = {float(entry["step"]) for entry in state.values()}
        if len(steps) > 1:
            raise ValueError(f"optimizer state with different steps per parameter ({sorted(steps)})")
        moments = _moments(self.flat, state, self.moments)
        self.state = moments
        self.step_count = torch.tensor(steps.pop() if steps else 0.0, dtype=torch.float32)


class Adam(_FlatOptimizer):
    """Adam (Kingma & Ba 2015) as ``torch.optim.Adam(params, lr, betas, eps)``, on a FlatParams."""

    moments = ("exp_avg", "exp_avg_sq")

    def __init__(self, flat: FlatParams, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decay: Tensor | None = None):
        super().__init__(flat, weight_decay, decay)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.hyperparameters = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": False,
                                "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                                "fused": None, "decoupled_weight_decay": False}

    def _update(self) -> None:
        grad, weight_decay = self._grad_and_decay()
        adam([self.flat.data], [grad], [self.state["exp_avg"]], [self.state["exp_avg_sq"]], [], [self.step_count],
             foreach=False, amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=self.lr,
             weight_decay=weight_decay, eps=self.eps, maximize=False)


class RMSprop(_FlatOptimizer):
    """RMSProp as ``torch.optim.RMSprop(params, lr, alpha, eps, weight_decay, momentum, centered)``.

    Graves 2013's variant (the NTM paper's optimizer) is centered=True, momentum 0.9, alpha 0.95.
    """

    def __init__(self, flat: FlatParams, lr: float, alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0,
                 centered: bool = False, weight_decay: float = 0.0, decay: Tensor | None = None):
        # the moments torch.optim.RMSprop keeps for these settings, and no others (its state_dict has the same keys)
        self.moments = ("square_avg",) + (("momentum_buffer",) if momentum > 0 else ()) + (
            ("grad_avg",) if centered else ())
        super().__init__(flat, weight_decay, decay)
        self.lr, self.alpha, self.eps, self.momentum, self.centered = lr, alpha, eps, momentum, centered
        self.hyperparameters = {"lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps, "centered": centered,
                                "weight_decay": weight_decay, "capturable": False, "foreach": None, "maximize": False,
                                "differentiable": False}

    def _update(self) -> None:
        state = self.state
        grad, weight_decay = self._grad_and_decay()
        rmsprop([self.flat.data], [grad], [state["square_avg"]],
                [state["grad_avg"]] if self.centered else [], [state["momentum_buffer"]] if self.momentum > 0 else [],
                [self.step_count], foreach=False, lr=self.lr, alpha=self.alpha, eps=self.eps,
                weight_decay=weight_decay, momentum=self.momentum, centered=self.centered)
