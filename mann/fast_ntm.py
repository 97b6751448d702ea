"""Fast path of the NTM (mann.ntm.NTM): the whole sequence as one autograd node with a hand-written backward.

Read :mod:`mann.fast` first. :func:`ntm_step` is ``NTM.step`` without autograd, returning what the backward
needs; :func:`ntm_step_backward` is its reverse, mechanism by mechanism from the bottom of ``NTM.step`` up.
:class:`NTMSequence` runs them over the sequence; weight gradients are one matmul over all steps.

Symbols as in Graves et al. (2014), Sec. 3: k key, beta strength, g gate, s shift weights, gamma sharpening,
e erase, a add; w^c content, w^g interpolated, w~ shifted, w final weighting.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mann.fast import (
    SHARPEN_EPS,
    SOFTPLUS_THRESHOLD,
    bias_grad,
    clip_pass,
    content_backward,
    content_forward,
    flatten_tree,
    fused_kernels,
    linear,
    lstm_backward_constants,
    lstm_forward,
    lstm_step_backward,
    one_thread,
    output_backward,
    softmax_backward,
    unflatten_tree,
    weight_grad,
    write_backward,
    write_forward,
)


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


def rotations(w: Tensor, S: int, sign: int = 1) -> Tensor:
    """w [B, H, N] rotated by each offset off_m = m - k (m = 0..2k, S = 2k + 1): [B, H, S, N] with
    out[..., m, i] = w[(i - sign * off_m) mod N]. torch.roll ran ~1.5x (B = 16) to ~8x (B = 128) faster here than
    gathering w[..., index] for the same [B, H, N, S] numbers."""
    k = S // 2
    return torch.stack([torch.roll(w, sign * (m - k), dims=-1) for m in range(S)], dim=-2)


# ----------------------------------------------------------------------------------------------------------------
# One step and its reverse


def ntm_step(xp: Tensor, r: Tensor, h: Tensor | None, c: Tensor | None, M: Tensor, w_prev: Tensor, w_rec: Tensor,
             w_if_t: Tensor, b_if: Tensor, d: NTMDims, kern=None):
    """NTM.step without autograd. xp: [B, 4C] (or [B, C]) the controller's input projection of x_t plus biases;
    r: [B, R W]; h, c: [B, C] (None for a feedforward controller); M: [B, N, W]; w_prev: [B, H, N]; w_if_t: the
    interface weight transposed, [C, P] (or [S, C, P]).
    ``kern``: the fused kernels (:func:`heads_kernels`) to run the LSTM update and steps 2-4 with, or None for
    the PyTorch ops.

    Returns (h, c, r, M_t, w_t, saved): the next state and what :func:`ntm_step_backward` needs.
    """
    R, Hw, W, S, hp, clip = d.R, d.Hw, d.W, d.S, d.hp, d.clip
    B, H = M.shape[0], R + Hw
    # 1. controller on [x_t, r_{t-1}]
    if d.lstm:
        pre = linear(torch.cat([r, h], dim=1), w_rec, xp)
        h, c, act, tanh_c = lstm_forward(pre, c) if kern is None else kern.cell.cell_forward(pre, c)
    else:
        h = torch.tanh(linear(r, w_rec, xp))
        act = tanh_c = None
    # 2. head parameters from one layer, clipped, split and squashed; scalars stay [B, H, 1] to broadcast over slots
    raw = linear(h, w_if_t, b_if)
    if kern is not None:  # steps 2-4 in one call: same maths, see mann/csrc/ntm_heads.cpp
        r, M_next, w, aux = kern.heads.heads_forward(raw, M, w_prev, R, Hw, S, clip or 0.0)
        return h, c, r, M_next, w, (raw, act, c, tanh_c, M, w_prev, w, aux)
    p = raw if clip is None else raw.clamp(-clip, clip)
    key, beta, gate, shift_w, gamma = p[:, : H * hp].view(B, H, hp).split([W, 1, 1, S, 1], dim=-1)
    key, beta, gate = torch.tanh(key), F.softplus(beta), torch.sigmoid(gate)  # k in (-1, 1), beta >= 0, g in (0, 1)
    shift_w, gamma = torch.softmax(shift_w, dim=-1), 1 + F.softplus(gamma)  # s over offsets -k..k, gamma >= 1
    erase, add = p[:, H * hp :].view(B, Hw, 2 * W).split(W, dim=-1)
    erase, add = torch.sigmoid(erase), torch.tanh(add)
    # 3. addressing (Sec. 3.3) of all heads on M_{t-1}
    wc, content_saved = content_forward(M, key, beta)
    wg = torch.lerp(w_prev, wc, gate)  # g w^c + (1 - g) w_{t-1}
    rotated = rotations(wg, S)  # [B, H, S, N]: w^g[(i - offset) mod N]
    ws_eps = (rotated * shift_w[..., None]).sum(-2) + SHARPEN_EPS  # w~ = sum_m s_m w^g[(i - off_m) mod N], + eps
    log_ws = torch.log(ws_eps)
    w = torch.softmax(gamma * log_ws, dim=-1)  # w~^gamma / sum w~^gamma
    # 4. read from M_{t-1}, then erase and add
    r = torch.bmm(w[:, :R], M).view(B, R * W)
    M_next, write_saved = write_forward(M, w[:, R:], erase, add)
    saved = (raw, act, c, tanh_c, content_saved, w_prev, wc, gate, rotated, shift_w, ws_eps, log_ws, gamma, w,
             write_saved)
    return h, c, r, M_next, w, saved


def ntm_step_backward(gM: Tensor, gw: Tensor, gr: Tensor, gh: Tensor, gc: Tensor | None, saved: tuple,
                      d_raw: Tensor | None, lstm_t: tuple | Tensor, w_if: Tensor, w_in: Tensor, d: NTMDims,
                      kern=None):
    """The reverse of :func:`ntm_step`: gradients of its outputs (M_t, w_t, r_t, h_t, c_t) -> those of its inputs
    (M_{t-1}, w_{t-1}, r_{t-1}, h_{t-1}, c_{t-1}) and of its pre-activations (controller [B, 4C], head raw
    parameters [B, P]), from which the caller gets the weight gradients.

    d_raw: d(squashed)/d(raw) of the head parameters at this step; lstm_t: this step's
    :func:`mann.fast.lstm_backward_constants` (or d tanh/d pre for a feedforward controller). With ``kern`` (the
    forward ran it) steps 4-2 are one call that applies the head derivatives itself (``d_raw`` unused), and an
    LSTM's ``lstm_t`` is (act, c_{t-1}, tanh(c_t)) for the fused cell backward. w_in: the controller's weight on
    [r_{t-1}, h_{t-1}], [4C, R W + C] (or [C, R W], or stacked per seed).
    """
    R, Hw, W, hp = d.R, d.Hw, d.W, d.hp
    if kern is not None:
        raw, _act, _c, _tanh_c, M, w_prev, w, aux = saved
        g_M, g_w_prev, g_raw = kern.heads.heads_backward(raw, M, w_prev, w, aux, gM, gw, gr.contiguous(), R, Hw,
                                                         d.S, d.clip or 0.0)
        return (g_M, g_w_prev, *_controller_backward(linear(g_raw, w_if, gh), gc, lstm_t, w_in, d, kern), g_raw)
    (_raw, _act, _c, _tanh_c, content_saved, w_prev, wc, gate, rotated, shift_w, ws_eps, log_ws, gamma, w,
     write_saved) = saved
    M = content_saved[0]  # M_{t-1}
    B, H = M.shape[0], R + Hw
    gr = gr.view(B, R, W)
    # 4. read r = w^r M_{t-1}; write M_t = M_{t-1} * prod_h (1 - w_h e_h^T) + w^T a
    g_w_read = torch.bmm(gr, M.transpose(1, 2))
    g_M, g_w_write, g_erase, g_add = write_backward(gM, write_saved)
    g_M = torch.baddbmm(g_M, w[:, :R].transpose(1, 2), gr)
    # 3. back through sharpen, shift, interpolate, content
    gz = softmax_backward(w, torch.cat([g_w_read, g_w_write], dim=1) + gw)
    g_gamma = (gz * log_ws).sum(-1, keepdim=True)
    g_ws = gz * gamma / ws_eps
    g_shift = (rotated * g_ws[..., None, :]).sum(-1)  # [B, H, S]
    g_wg = (rotations(g_ws, d.S, sign=-1) * shift_w[..., None]).sum(-2)  # sum_m s_m dw~[(j + off_m) mod N]
    g_wc = g_wg * gate
    g_w_prev = g_wg - g_wc  # (1 - g) dw^g
    g_gate = (g_wg * (wc - w_prev)).sum(-1, keepdim=True)
    g_M, g_key, g_beta, _ = content_backward(g_wc, content_saved, g_M)
    # 2. head parameters in the interface layout: per head (k, beta, g, s, gamma), then per write head (e, a)
    g_heads = torch.cat([g_key, g_beta, g_gate, softmax_backward(shift_w, g_shift), g_gamma], dim=-1)
    g_raw = torch.cat([g_heads.view(B, H * hp), torch.cat([g_erase, g_add], dim=-1).view(B, Hw * 2 * W)], dim=1)
    g_raw = g_raw * d_raw
    return (g_M, g_w_prev, *_controller_backward(linear(g_raw, w_if, gh), gc, lstm_t, w_in, d), g_raw)


def _controller_backward(gh: Tensor, gc: Tensor | None, lstm_t: tuple | Tensor, w_in: Tensor, d: NTMDims,
                         kern=None):
    """Step 1's reverse: (g r_{t-1} [B, R W], g h_{t-1}, g c_{t-1}, g pre-activations) from those of h_t, c_t."""
    if d.lstm and kern is not None:
        g_pre, gc = kern.cell.cell_backward(gh, gc, *lstm_t)
    elif d.lstm:
        g_pre, gc = lstm_step_backward(gh, gc, *lstm_t)
    else:
        g_pre = gh * lstm_t
    g_in = linear(g_pre, w_in)  # [B, R W (+ C)]
    gh_prev = g_in[:, d.R * d.W :] if d.lstm else None
    return g_in[:, : d.R * d.W], gh_prev, gc, g_pre


class Kernels(NamedTuple):
    """mann/csrc's fused CPU kernels the NTM step uses (built by mann.native)."""

    heads: object  # ntm_heads.cpp: squashes, addressing, read and write of every head
    cell: object  # lstm_cell.cpp: the LSTM update from its pre-activations


def heads_kernels(x: Tensor) -> Kernels | None:
    """The fused kernels where they run for ``x`` (CPU, float32/64) and could be built, else None."""
    modules = fused_kernels(x, "ntm_heads", "lstm_cell")
    return None if modules is None else Kernels(*modules)


def head_derivative(raws: Tensor, d: NTMDims) -> Tensor:
    """d(squashed)/d(raw) of the head parameters of every step, [T, B, P], times the clip's pass-through.

    Keys and add vectors use tanh, strengths and gamma softplus, gates and erase sigmoid; the shift logits go
    through a softmax whose backward :func:`ntm_step_backward` applies (1 here).
    """
    p = raws if d.clip is None else raws.clamp(-d.clip, d.clip)
    sig, tnh = torch.sigmoid(p), torch.tanh(p)
    kinds = ([0] * d.W + [2, 1] + [3] * d.S + [2]) * (d.R + d.Hw) + ([1] * d.W + [0] * d.W) * d.Hw
    kind = torch.tensor(kinds, device=raws.device)  # 0 tanh, 1 sigmoid, 2 softplus, 3 identity
    d_soft = torch.where(p > SOFTPLUS_THRESHOLD, torch.ones_like(p), sig)
    out = torch.where(kind == 0, 1 - tnh.square(),
                      torch.where(kind == 1, sig * (1 - sig), torch.where(kind == 2, d_soft, torch.ones_like(p))))
    return out * clip_pass(raws, d.clip)


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
        # [R W + C, 4C] (or [S, ...]: see mann.fast.linear)
        bias, w_rec = b_ih + b_hh, torch.cat([w_ih[..., I:], w_hh], dim=-1).mT
    else:
        w_ih, bias, w_if, b_if, w_out, b_out = params
        w_rec = w_ih[..., I:].mT
    # the input's share of the controller pre-activations, every step in one matmul
    xproj = linear(x, w_ih[..., :I].mT, bias)  # [B, T, 4C (or C)]
    h0, c0 = h, c
    M, w, r = memory, weights, reads.reshape(B, -1)
    steps, hs, rs = [], [], []
    kern = heads_kernels(x)
    w_if_t = w_if.mT
    xps = xproj.unbind(1)  # one op for the 41 per-step views
    with one_thread(x, memory.numel(), kern):
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
    # the kernels' per-step tuples are flat already: no tree walk (~0.4 ms per sequence each way)
    flat, spec = ([v for step in steps for v in step], None) if kern else flatten_tree(steps)
    batched = [x, memory, weights, reads, h0, c0, H_all, R_all, hr, y_raw]
    layout = dict(batched=len(batched), spec=spec, T=T, kernels=kern is not None)
    return y, {"tensors": [*batched, *flat, *params], "layout": layout}


def ntm_backward(ctx, gy: Tensor):
    model, lay = ctx.model, ctx.layout
    d = dims_of(model)
    saved = ctx.saved_tensors
    nb, T = lay["batched"], lay["T"]
    x, memory, weights, reads, h0, c0, H_all, R_all, hr, y_raw = saved[:nb]
    params = saved[-len(param_names(model)) :]
    per_step = saved[nb : -len(params)]
    if lay["kernels"]:
        n = len(per_step) // T
        steps = [per_step[i * n : (i + 1) * n] for i in range(T)]
    else:
        steps = unflatten_tree(lay["spec"], per_step)
    B, _, I = x.shape
    C = H_all.shape[2]
    RW = d.R * d.W
    if d.lstm:
        w_ih, w_hh, _b_ih, _b_hh, w_if, _b_if, w_out, _b_out = params
        w_in = torch.cat([w_ih[..., I:], w_hh], dim=-1)  # the controller's weight on [r_{t-1}, h_{t-1}]
        c_prev = [c0, *(s[2] for s in steps[:-1])]
        if lay["kernels"]:  # the fused cell backward takes (act, c_{t-1}, tanh(c_t)) as they are (contiguous)
            lstm_consts = [(s[1], c.contiguous(), s[3]) for s, c in zip(steps, c_prev, strict=True)]
        else:
            act, tanh_c = torch.stack([s[1] for s in steps]), torch.stack([s[3] for s in steps])
            lstm_consts = lstm_backward_constants(act, torch.stack(c_prev), tanh_c)
    else:
        w_ih, _b, w_if, _b_if, w_out, _b_out = params
        w_in = w_ih[..., I:]
        lstm_consts = (1 - H_all.square()).unbind(1)  # d tanh / d pre
    g_hr, g_w_out, g_b_out = output_backward(gy, y_raw, hr, w_out, d.clip)
    gh_out, gr_out = g_hr[..., :C].unbind(1), g_hr[..., C:].unbind(1)
    kern = heads_kernels(x) if lay["kernels"] else None
    d_raw = [None] * T if kern else head_derivative(torch.stack([s[0] for s in steps]), d).unbind(0)

    gM, gw = torch.zeros_like(memory), torch.zeros_like(weights)
    gr = x.new_zeros(B, RW)
    gh = x.new_zeros(B, C)
    gc = x.new_zeros(B, C) if d.lstm else None
    g_pres, g_raws = [], []
    with one_thread(x, memory.numel(), kern):
        for t in range(T - 1, -1, -1):
            gh_t = gh_out[t] if gh is None else gh + gh_out[t]
            gM, gw, gr, gh, gc, g_pre, g_raw = ntm_step_backward(gM, gw, gr + gr_out[t], gh_t, gc, steps[t],
                                                                d_raw[t], lstm_consts[t], w_if, w_in, d, kern)
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
    """NTM.forward through the fast path: x [B, T, I] -> logits [B, T, O]. ``params``: the weights to use instead of
    the model's, in :func:`param_names`' order, each as the model's or stacked per seed (see mann.fast.linear)."""
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

