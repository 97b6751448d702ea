"""The fused CPU path: the NTM's and the DNC's whole sequence as one autograd node, each time step one call into
mann/csrc's kernels, with a hand-written backward.

Why. On a CPU the reference models spend most of a training step in framework overhead, not arithmetic: a time
step is ~50 (NTM) to ~100 (DNC) small tensor ops forward, each recorded by autograd with its own backward node, on
tiny tensors (batch 16). Here the forward loop runs with autograd off; per time step the controller's matrix
product and the LSTM cell, then one kernel call for every memory mechanism (mann/csrc/ntm_heads.cpp,
dnc_step.cpp), keeping only what the backward needs. The backward walks the steps in reverse with the kernels'
reverses, and every weight gradient is one matmul over all time steps. The maths and parameters are the models':
tests/test_fast.py checks the logits and every gradient against the reference models in float64 (1e-10).

Only the kernels: a PyTorch-ops version of the same backward (no compiler needed) ran the NTM step in 141 ms of
CPU against 286 ms for the reference and 56 ms fused (bench/step.py --threads 1, docs/performance.md); every
supported setup builds the kernels (a C++ compiler is a dependency, cluster.yaml builds them on each node), so
without one the reference runs (mann.dispatch) rather than a second hand-written backward to keep equal.

This module holds what both architectures share (the kernels' loading, the linear maps of one model or of stacked
seeds, the output layer's backward) and the entry point :func:`forward`; :mod:`mann.fast_ntm` and
:mod:`mann.fast_dnc` hold each architecture's step, its reverse, and the ``autograd.Function`` over the sequence.
:mod:`mann.dispatch` decides when this path runs.

Conventions: per-step tensors are kept in lists over time; tensors over all steps are batch-major (``[B, T, ...]``,
the models' layout); ``g*`` is the gradient of the loss w.r.t. ``*``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mann.dnc import DNC
from mann.ntm import NTM


def fused_kernels(*names: str) -> tuple | None:
    """mann/csrc's kernel modules ``names`` (built by mann.native), or None where any could not be built."""
    from mann import native

    modules = tuple(native.kernels(name) for name in names)
    return None if any(m is None for m in modules) else modules


def clip_pass(raw: Tensor, clip: float | None) -> Tensor | float:
    """Where clamp(raw, -clip, clip) passes the gradient (torch: -clip <= raw <= clip), as 0/1."""
    return 1.0 if clip is None else ((raw >= -clip) & (raw <= clip)).to(raw.dtype)


def output_backward(gy: Tensor, y_raw: Tensor, hr: Tensor, w_out: Tensor, clip: float | None):
    """Back through y = clip(W_o [h, r] + b_o) for all steps at once. gy, y_raw [B, T, O]; hr [B, T, C + R W]
    -> (gradient of hr [B, T, C + R W], of W_o, of b_o)."""
    gy = gy * clip_pass(y_raw, clip)
    return linear(gy, w_out), weight_grad(gy, hr, w_out), bias_grad(gy, w_out)


# Linear maps of one model, or of S seeds at once (mann.multiseed). A weight with a leading seed axis, [S, ...],
# applies to S equal blocks of rows: rows s*B .. (s+1)*B - 1 of a [S*B, ...] batch through seed s's weights (one
# bmm for all seeds). Everything else in the fused path is per row already, so this is all that seeds change.
# Tensors over all steps are batch-major, [S*B, T, ...], so that each seed's block is contiguous: no copies.


def linear(x: Tensor, w: Tensor, add: Tensor | None = None) -> Tensor:
    """x @ w (+ add). x: [rows, ..., k]; w: [k, n] or [S, k, n]; add: [n], x's shape with n, or [S, n] (a bias
    per seed, with stacked w)."""
    n = w.shape[-1]
    if w.dim() == 2 and x.dim() == 2:  # one time step's rows: no reshapes (each is a dispatch, ~1 us here)
        return x @ w if add is None else torch.addmm(add, x, w)
    if w.dim() == 2:
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ w if add is None else torch.addmm(add if add.dim() == 1 else add.reshape(-1, n), flat, w)
        return y.view(*x.shape[:-1], n)
    S = w.shape[0]
    xs = x.reshape(S, -1, x.shape[-1])
    y = torch.bmm(xs, w) if add is None else torch.baddbmm(add.reshape(S, -1, n), xs, w)
    return y.view(*x.shape[:-1], n)


def weight_grad(g: Tensor, a: Tensor, like: Tensor) -> Tensor:
    """Gradient of W in y = a W^T (+ b), summed over rows and steps: g [rows, ..., n], a [rows, ..., k] -> [n, k],
    or [S, n, k] when ``like`` (the weight) is stacked per seed."""
    n, k = g.shape[-1], a.shape[-1]
    if like.dim() == 2:
        return g.reshape(-1, n).t() @ a.reshape(-1, k)
    S = like.shape[0]
    return torch.bmm(g.reshape(S, -1, n).transpose(1, 2), a.reshape(S, -1, k))


def bias_grad(g: Tensor, like: Tensor) -> Tensor:
    """Gradient of a bias added to every row and step: g [rows, ..., n] -> [n], or [S, n] (``like`` stacked)."""
    n = g.shape[-1]
    return g.reshape(-1, n).sum(0) if like.dim() == 2 else g.reshape(like.shape[0], -1, n).sum(1)


# ----------------------------------------------------------------------------------------------------------------
# Entry points (mann.dispatch decides when)


def unsupported(model) -> str | None:
    """Why ``model``'s layers do not fit the fused path (None: they do).

    The fused path reads the weights of the model's own layers (or takes them as ``params``), so a model whose
    layers were swapped (e.g. mann.multiseed's folded copy for other models) runs its reference code.
    """
    if not isinstance(model, NTM | DNC):
        return f"no fused path for {type(model).__name__}"
    controller = (nn.LSTMCell,) if isinstance(model, DNC) or model.cfg.controller == "lstm" else (nn.Linear,)
    layers = {"controller": controller, "interface": (nn.Linear,), "output": (nn.Linear,)}
    for name, types in layers.items():
        layer = getattr(model, name, None)
        if type(layer) not in types:
            return f"{type(model).__name__}.{name} is a {type(layer).__name__}, not {types[0].__name__}"
    return None


def kernels_for(model):
    """The kernels ``model``'s fused path calls (built on first use), or None where they cannot be built."""
    if isinstance(model, NTM):
        from mann.fast_ntm import heads_kernels as kernels
    else:
        from mann.fast_dnc import step_kernels as kernels
    return kernels()


def forward(model, x: Tensor, state=None, memory_size: int | None = None, params=None) -> Tensor:
    """model(x, state, memory_size) through the fused path; x [B, T, I] (CPU, float32/64) -> logits [B, T, O].

    ``params``: weights to use instead of the model's, named by :func:`param_names` (same order), each either of
    the model's shape or stacked for S seeds ([S, ...]; x, state and logits then hold S blocks of B/S rows, block s
    run with seed s's weights: how mann.multiseed trains many seeds at once).
    """
    why = unsupported(model)
    if why is None and (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)):
        why = f"the fused kernels take float32/64 CPU tensors, not {x.dtype} on {x.device.type}"
    if why is None and kernels_for(model) is None:
        why = "mann/csrc's kernels could not be built here"
    if why is not None:
        raise ValueError(why)
    if isinstance(model, NTM):
        from mann.fast_ntm import ntm_forward

        return ntm_forward(model, x, state, memory_size, params)
    from mann.fast_dnc import dnc_forward

    return dnc_forward(model, x, state, memory_size, params)


def param_names(model) -> tuple[str, ...]:
    """The names of the parameters the fused path of ``model`` differentiates, in the order ``forward`` takes them."""
    if isinstance(model, NTM):
        from mann.fast_ntm import param_names as names
    else:
        from mann.fast_dnc import param_names as names
    return names(model)
