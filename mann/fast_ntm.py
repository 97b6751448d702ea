"""Fused path of the NTM (mann.ntm.NTM): the whole sequence as one autograd node, each time step's heads one call
into mann/csrc/ntm_heads.cpp.

Read :mod:`mann.fast` first. :func:`ntm_step` is ``NTM.step`` without autograd, returning what the backward
needs; :func:`ntm_step_backward` is its reverse. :class:`NTMSequence` runs them over the sequence; weight
gradients are one matmul over all steps.

Symbols as in Graves et al. (2014), Sec. 3: k key, beta strength, g gate, s shift weights, gamma sharpening,
e erase, a add; w the heads' weightings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mann.fast_shared import bias_grad, fused_kernels, linear, output_backward, weight_grad


class NTMDims(NamedTuple):
    R: int  # read heads
    Hw: int  # write heads
    W: int  # word size
    S: int  # shift weights (2k + 1)
    hp: int  # interface numbers per head: k (W), beta, g, s (S), gamma
    clip: float | None
    lstm: bool  # LSTM controller (else feedforward)


def dims_of(model) -> NTMDims:
    cfg = model.cfg
    return NTMDims(cfg.read_heads, cfg.write_heads, cfg.word_size, 2 * cfg.shift_range + 1, model.head_params,
                   cfg.clip_value, cfg.controller == "lstm")


class Kernels(NamedTuple):
    """mann/csrc's fused CPU kernels the NTM step uses (built by mann.native)."""

    heads: object  # ntm_heads.cpp: squashes, addressing, read and write of every head
    cell: object  # lstm_cell.cpp: the LSTM update from its pre-activations


# ----------------------------------------------------------------------------------------------------------------
# One step and its reverse


def ntm_step(xp: Tensor, r: Tensor, h: Tensor | None, c: Tensor | None, M: Tensor, w_prev: Tensor, w_rec: Tensor,
             w_if_t: Tensor, b_if: Tensor, d: NTMDims, kern: Kernels):
    """NTM.step without autograd. xp: [B, 4C] (or [B, C]) the controller's input projection of x_t plus biases;
    r: [B, R W]; h, c: [B, C] (None for a feedforward controller); M: [B, N, W]; w_prev: [B, H, N]; w_if_t: the
    interface weight transposed, [C, P] (or [S, C, P]).

    Returns (h, c, r, M_t, w_t, saved): the next state and what :func:`ntm_step_backward` needs.
    """
    # 1. controller on [x_t, r_{t-1}]
    if d.lstm:
        pre = linear(torch.cat([r, h], dim=1), w_rec, xp)
        h, c, act, tanh_c = kern.cell.cell_forward(pre, c)
    else:
        h = torch.tanh(linear(r, w_rec, xp))
        act = tanh_c = None
    # 2.-4. head parameters (clipped, squashed), addressing of all heads on M_{t-1}, read, erase and add: one call
    raw = linear(h, w_if_t, b_if)
    r, M_next, w, aux = kern.heads.heads_forward(raw, M, w_prev, d.R, d.Hw, d.S, d.clip or 0.0)
    return h, c, r, M_next, w, (raw, act, c, tanh_c, M, w_prev, w, aux)


def ntm_step_backward(gM: Tensor, gw: Tensor, gr: Tensor, gh: Tensor, gc: Tensor | None, saved: tuple,
                      lstm_t: tuple | Tensor, w_if: Tensor, w_in: Tensor, d: NTMDims, kern: Kernels):
    """The reverse of :func:`ntm_step`: gradients of its outputs (M_t, w_t, r_t, h_t, c_t) -> those of its inputs
    (M_{t-1}, w_{t-1}, r_{t-1}, h_{t-1}, c_{t-1}) and of its pre-activations (controller [B, 4C], head raw
    parameters [B, P]), from which the caller gets the weight gradients.

    lstm_t: (act, c_{t-1}, tanh(c_t)) for the fused cell backward (or d tanh/d pre for a feedforward controller).
    w_in: the controller's weight on [r_{t-1}, h_{t-1}], [4C, R W + C] (or [C, R W], or stacked per seed).
    """
    raw, _act, _c, _tanh_c, M, w_prev, w, aux = saved
    g_M, g_w_prev, g_raw = kern.heads.heads_backward(raw, M, w_prev, w, aux, gM, gw, gr.contiguous(), d.R, d.Hw,
                                                     d.S, d.clip or 0.0)
    return (g_M, g_w_prev, *_controller_backward(linear(g_raw, w_if, gh), gc, lstm_t, w_in, d, kern), g_raw)


def _controller_backward(gh: Tensor, gc: Tensor | None, lstm_t: tuple | Tensor, w_in: Tensor, d: NTMDims,
                         kern: Kernels):
    """Step 1's reverse: (g r_{t-1} [B, R W], g h_{t-1}, g c_{t-1}, g pre-activations) from those of h_t, c_t."""
    if d.lstm:
        g_pre, gc = kern.cell.cell_backward(gh, gc, *lstm_t)
    else:
        g_pre = gh * lstm_t
    g_in = linear(g_pre, w_in)  # [B, R W (+ C)]
    gh_prev = g_in[:, d.R * d.W :] if d.lstm else None
    return g_in[:, : d.R * d.W], gh_prev, gc, g_pre


def heads_kernels() -> Kernels | None:
    """The kernels, built on first use; None where they could not be built."""
    modules = fused_kernels("ntm_heads", "lstm_cell")
    return None if modules is None else Kernels(*modules)


# ----------------------------------------------------------------------------------------------------------------
# The sequence


class NTMSequence(torch.autograd.Function):
    """Logits [B, T, O] from x, the initial state (M_0, w_0, r_0, h_0, c_0) and the weights."""

    @staticmethod
    def forward(ctx, model, x, memory, weights, reads, h, c, *params):
        y, saved = ntm_loop(model, x, memory, weights, reads, h, c, params, save=True)
        ctx.model, ctx.layout = model, saved["layout"]
        ctx.save_for_backward(*saved["tensors"])
        return y

    @staticmethod
    def backward(ctx, gy):
        return (None, *ntm_backward(ctx, gy))


def param_names(model) -> tuple[str, ...]:
    """The names of the weights NTMSequence differentiates, in its order: controller, interface, output."""
    if model.cfg.controller == "lstm":
        ctrl = ("controller.weight_ih", "controller.weight_hh", "controller.bias_ih", "controller.bias_hh")
    else:
        ctrl = ("controller.weight", "controller.bias")
    return (*ctrl, "interface.weight", "interface.bias", "output.weight", "output.bias")


def ntm_params(model) -> tuple[Tensor, ...]:
    return tuple(model.get_parameter(name) for name in param_names(model))


def ntm_loop(model, x, memory, weights, reads, h, c, params, save: bool):
    """The forward over x [B, T, I]; with ``save`` also what :func:`ntm_backward` needs."""
    d = dims_of(model)
    B, T, I = x.shape
    if d.lstm:
        w_ih, w_hh, b_ih, b_hh, w_if, b_if, w_out, b_out = params
        # [R W + C, 4C] (or [S, ...]: see mann.fast_shared.linear)
        bias, w_rec = b_ih + b_hh, torch.cat([w_ih[..., I:], w_hh], dim=-1).mT
    else:
        w_ih, bias, w_if, b_if, w_out, b_out = params
        w_rec = w_ih[..., I:].mT
    # the input's share of the controller pre-activations, every step in one matmul
    xproj = linear(x, w_ih[..., :I].mT, bias)  # [B, T, 4C (or C)]
    h0, c0 = h, c
    M, w, r = memory, weights, reads.reshape(B, -1)
    steps, hs, rs = [], [], []
    kern = heads_kernels()
    w_if_t = w_if.mT
    xps = xproj.unbind(1)  # one op for the 41 per-step views
    for t in range(T):
        h, c, r, M, w, step_saved = ntm_step(xps[t], r, h, c, M, w, w_rec, w_if_t, b_if, d, kern)
        if save:
            steps.append(step_saved)
        hs.append(h), rs.append(r)
    H_all, R_all = torch.stack(hs, dim=1), torch.stack(rs, dim=1)  # [B, T, C], [B, T, R W]
    hr = torch.cat([H_all, R_all], dim=2)
    y_raw = linear(hr, w_out.mT, b_out)  # output layer, every step at once
    y = y_raw if d.clip is None else y_raw.clamp(-d.clip, d.clip)
    if not save:
        return y, None
    flat = [v for step in steps for v in step]  # through save_for_backward, so saved-tensor hooks count every byte
    batched = [x, memory, weights, reads, h0, c0, H_all, R_all, hr, y_raw]
    layout = dict(batched=len(batched), T=T)
    return y, {"tensors": [*batched, *flat, *params], "layout": layout}


def ntm_backward(ctx, gy: Tensor):
    model, lay = ctx.model, ctx.layout
    d = dims_of(model)
    saved = ctx.saved_tensors
    nb, T = lay["batched"], lay["T"]
    x, memory, weights, reads, h0, c0, H_all, R_all, hr, y_raw = saved[:nb]
    params = saved[-len(param_names(model)) :]
    per_step = saved[nb : -len(params)]
    n = len(per_step) // T
    steps = [per_step[i * n : (i + 1) * n] for i in range(T)]
    B, _, I = x.shape
    C = H_all.shape[2]
    RW = d.R * d.W
    if d.lstm:
        w_ih, w_hh, _b_ih, _b_hh, w_if, _b_if, w_out, _b_out = params
        w_in = torch.cat([w_ih[..., I:], w_hh], dim=-1)  # the controller's weight on [r_{t-1}, h_{t-1}]
        c_prev = [c0, *(s[2] for s in steps[:-1])]
        # the fused cell backward takes (act, c_{t-1}, tanh(c_t)) as they are (contiguous)
        lstm_consts = [(s[1], c.contiguous(), s[3]) for s, c in zip(steps, c_prev, strict=True)]
    else:
        w_ih, _b, w_if, _b_if, w_out, _b_out = params
        w_in = w_ih[..., I:]
        lstm_consts = (1 - H_all.square()).unbind(1)  # d tanh / d pre
    g_hr, g_w_out, g_b_out = output_backward(gy, y_raw, hr, w_out, d.clip)
    gh_out, gr_out = g_hr[..., :C].unbind(1), g_hr[..., C:].unbind(1)
    kern = heads_kernels()

    gM, gw = torch.zeros_like(memory), torch.zeros_like(weights)
    gr = x.new_zeros(B, RW)
    gh = x.new_zeros(B, C)
    gc = x.new_zeros(B, C) if d.lstm else None
    g_pres, g_raws = [], []
    for t in range(T - 1, -1, -1):
        gh_t = gh_out[t] if gh is None else gh + gh_out[t]
        gM, gw, gr, gh, gc, g_pre, g_raw = ntm_step_backward(gM, gw, gr + gr_out[t], gh_t, gc, steps[t],
                                                            lstm_consts[t], w_if, w_in, d, kern)
        g_pres.append(g_pre), g_raws.append(g_raw)

    # weight gradients, every step in one matmul
    g_pre, g_raw = torch.stack(g_pres[::-1], dim=1), torch.stack(g_raws[::-1], dim=1)  # [B, T, 4C (or C)], [B, T, P]
    r_prev = torch.cat([reads.reshape(B, 1, RW), R_all[:, :-1]], dim=1)
    g_w_ih = weight_grad(g_pre, torch.cat([x, r_prev], dim=2), w_ih)
    g_bias = bias_grad(g_pre, w_ih)
    g_x = linear(g_pre, w_ih[..., :I]) if ctx.needs_input_grad[1] else None
    g_iface = (weight_grad(g_raw, H_all, w_if), bias_grad(g_raw, w_if))
    if d.lstm:
        g_w_hh = weight_grad(g_pre, torch.cat([h0[:, None], H_all[:, :-1]], dim=1), params[1])
        ctrl = (g_w_ih, g_w_hh, g_bias, g_bias)
    else:
        ctrl, gh, gc = (g_w_ih, g_bias), None, None
    return (g_x, gM, gw, gr.view(B, d.R, d.W), gh, gc, *ctrl, *g_iface, g_w_out, g_b_out)


def ntm_forward(model, x: Tensor, state=None, memory_size: int | None = None, params=None) -> Tensor:
    """NTM.forward through the fused path: x [B, T, I] -> logits [B, T, O]. ``params``: the weights to use instead of
    the model's, in :func:`param_names`' order, each as the model's or stacked per seed (fast_shared.linear)."""
    if state is None:
        state = model.initial_state(x.shape[0], memory_size)
    params = ntm_params(model) if params is None else tuple(params)
    h, c = (t.contiguous() for t in state.controller) if model.cfg.controller == "lstm" else (None, None)
    weights = torch.cat([state.read_weights, state.write_weights], dim=1)
    inputs = (x, state.memory.contiguous(), weights, state.reads.contiguous(), h, c)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*inputs, *params))):
        with torch.no_grad():
            return ntm_loop(model, *inputs, params, save=False)[0]
    return NTMSequence.apply(model, *inputs, *params)

