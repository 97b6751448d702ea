"""What the NTM's and the DNC's fused paths (:mod:`mann.fast_ntm`, :mod:`mann.fast_dnc`) share: loading
mann/csrc's kernels, the linear maps of one model or of stacked seeds and their gradients, the output layer's
backward. The entry point, which picks the architecture's path, is :mod:`mann.fast`.

Conventions as there: tensors over all steps are batch-major (``[B, T, ...]``); ``g*`` is the gradient of the loss
w.r.t. ``*``.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
