"""Fused path of the DNC (mann.dnc.DNC): the whole sequence as one autograd node, each time step's memory
mechanisms one call into mann/csrc/dnc_step.cpp.

Read :mod:`mann.fast` first. Per time step the controller's matrix product and the LSTM cell run here, then one
kernel call does steps 2-6 of ``DNC.step`` (every option of DNCConfig: masking, de-allocation, sharpness, several
write heads); the backward is one call per step the other way. The kernel makes one pass over the link matrix
L_t [B, Hw, N, N] per step forward (update and both directional weightings) and one backward (reading L_{t-1}
only: it recomputes L_t's rows).

The link matrices are what a sequence's memory is made of: the reference's autograd graph keeps several N x N
tensors per step; here only L_t is kept (it is L_{t-1} of the next step), or, when the T of them do not fit in
LINK_KEEP_BYTES, one every ~sqrt(T) steps with the rest recomputed in the backward (:class:`LinkHistory`).

Symbols: w^w / w^r write and read weightings, p precedence, u usage (DNC Methods).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from mann.fast_shared import bias_grad, fused_kernels, linear, output_backward, weight_grad

LINK_KEEP_BYTES = 24 * 2**20  # keep every L_t while they all fit in this (about the L3 cache); else checkpoint


class LinkHistory:
    """The link matrices L_t of one sequence, [B, Hw, N, N] each: what the backward needs, and no more.

    Forward writes each L_t with the step kernel. If all T of them fit in LINK_KEEP_BYTES each is kept; otherwise
    one buffer is updated in place and a copy kept every ``every`` ~ sqrt(T) steps, and the backward recomputes
    the steps between from the (small) w^w_t and p_{t-1}: a few passes over a working set that stays in cache,
    instead of T matrices in main memory (N = 256, B = 16, T = 41: 172 MB).
    """

    def __init__(self, link0: Tensor, steps: int, save: bool):
        nbytes = link0.numel() * link0.element_size()
        self.every = 1 if steps * nbytes <= LINK_KEEP_BYTES else max(2, round(math.sqrt(steps)))
        self.steps, self.save = steps, save
        self.keep_all = save and self.every == 1  # then each L_t is a new tensor (kept), else one buffer
        self.L = link0 if self.keep_all else link0.clone()
        self.kept = [link0] if save else []  # every == 1: L_{-1}, L_0, ...; else L_{-1}, L_{k-1}, L_{2k-1}, ...

    def buffers(self) -> tuple[Tensor, Tensor]:
        """(L_{t-1}, where L_t goes): a new tensor if every L_t is kept, else L_{t-1}'s own buffer."""
        return self.L, (torch.empty_like(self.L) if self.keep_all else self.L)

    def record(self, t: int, L: Tensor) -> Tensor:
        """Take L_t (written where :meth:`buffers` said) as the current link, keeping a copy if it is due."""
        self.L = L
        if self.keep_all:
            self.kept.append(L)
        elif self.save and (t + 1) % self.every == 0 and t < self.steps - 1:
            self.kept.append(L.clone())
        return L

    @staticmethod
    def reverse(kept: list[Tensor], every: int, steps: int, write_w: list[Tensor], p_prev: list[Tensor], update):
        """Yield (t, L_{t-1}) for t = T-1 .. 0, recomputing between kept copies when ``every`` > 1 with
        ``update(L_prev, ww, p_prev, out)`` (the kernel's link update; its backward reads only L_{t-1})."""
        if every == 1:
            for t in range(steps - 1, -1, -1):
                yield t, kept[t]
            return
        buffers = [torch.empty_like(kept[0]) for _ in range(every - 1)]
        for j in range(len(kept) - 1, -1, -1):
            start, end = j * every, min((j + 1) * every, steps)
            prev = kept[j]
            for t in range(start, end - 1):
                prev = update(prev, write_w[t], p_prev[t], buffers[t - start])
            for t in range(end - 1, start - 1, -1):
                yield t, buffers[t - start - 1] if t > start else kept[j]


# ----------------------------------------------------------------------------------------------------------------
# One step and its reverse


class Kernels(NamedTuple):
    """mann/csrc's fused CPU kernels the DNC step uses (built by mann.native)."""

    step: object  # dnc_step.cpp: everything after the interface vector
    cell: object  # lstm_cell.cpp: the LSTM update from its pre-activations


def step_kernels() -> Kernels | None:
    """The kernels, built on first use; None where they could not be built."""
    modules = fused_kernels("dnc_step", "lstm_cell")
    return None if modules is None else Kernels(*modules)


# What the step kernel's backward reads, per time step, in this order
KERNEL_SAVED = ("raw", "act", "c", "tanh_c", "memory_prev", "read_w_prev", "write_w_prev", "precedence_prev",
                "usage_prev", "memory", "read_w", "write_w", "aux")


class Carry(NamedTuple):
    """The DNC state between steps (the link matrix lives in a LinkHistory)."""

    memory: Tensor  # M: [B, N, W]
    read_w: Tensor  # w^r: [B, R, N]
    write_w: Tensor  # w^w: [B, Hw, N]
    precedence: Tensor  # p: [B, Hw, N]
    usage: Tensor  # u: [B, N]
    reads: Tensor  # r: [B, R W]
    h: Tensor
    c: Tensor


def dnc_step(model, t: int, xp: Tensor, s: Carry, links: LinkHistory, w_rec: Tensor, w_if_t: Tensor, b_if: Tensor,
             kern: Kernels):
    """DNC.step without autograd. xp: [B, 4C], the input's share of the controller pre-activations; w_if_t: the
    interface weight transposed, [C, P] (or [S, C, P]).

    Returns (next Carry, saved): saved is what :func:`dnc_step_backward` needs.
    """
    cfg = model.cfg
    # 1. controller on [x_t, r_{t-1}]
    pre = linear(torch.cat([s.reads, s.h], dim=1), w_rec, xp)
    h, c, act, tanh_c = kern.cell.cell_forward(pre, s.c)
    # 2. interface vector xi_t; 3.-6. allocation, write, links, read: one call (mann/csrc/dnc_step.cpp)
    raw = linear(h, w_if_t, b_if)
    L_prev, L_out = links.buffers()
    M, wr, ww, p, u, r, aux = kern.step.step_forward(
        raw, s.memory, s.read_w, s.write_w, s.precedence, s.usage, L_prev, L_out, cfg.read_heads, cfg.write_heads,
        cfg.masking, cfg.deallocation, cfg.sharpness, cfg.clip_value or 0.0, cfg.mask_min)
    links.record(t, L_out)
    saved = dict(zip(KERNEL_SAVED, (raw, act, c, tanh_c, s.memory, s.read_w, s.write_w, s.precedence, s.usage, M,
                                    wr, ww, aux), strict=True))
    return Carry(M, wr, ww, p, u, r, h, c), saved


class Grads(NamedTuple):
    """Gradients w.r.t. a Carry (and the link matrix, kept apart)."""

    memory: Tensor
    read_w: Tensor
    write_w: Tensor
    precedence: Tensor
    usage: Tensor
    reads: Tensor  # [B, R W]
    h: Tensor
    c: Tensor


def dnc_step_backward(model, g: Grads, gL: Tensor, s: dict, L_prev: Tensor, lstm_t: tuple, w_in: Tensor,
                      w_if: Tensor, kern: Kernels):
    """The reverse of :func:`dnc_step`: gradients w.r.t. its outputs (``g``, and ``gL`` w.r.t. L_t, updated in place
    to w.r.t. L_{t-1}) -> gradients w.r.t. its inputs, and those of the controller pre-activations [B, 4C] and of
    the raw interface vector [B, P]. Steps 6-2 are one kernel call that reads only L_{t-1}; ``lstm_t`` is
    (act, c_{t-1}, tanh(c_t)) for the fused cell backward."""
    cfg = model.cfg
    gM, g_wr_prev, g_ww_prev, gp, g_u_prev, g_xi = kern.step.step_backward(
        s["raw"], s["memory_prev"], s["memory"], s["read_w_prev"], s["write_w_prev"], s["precedence_prev"],
        s["usage_prev"], L_prev, s["read_w"], s["write_w"], s["aux"], g.memory, g.read_w, g.write_w,
        g.precedence, g.usage, g.reads.contiguous(), gL, cfg.read_heads, cfg.write_heads, cfg.masking,
        cfg.deallocation, cfg.sharpness, cfg.clip_value or 0.0, cfg.mask_min)
    # step 1's reverse, from the raw interface's gradient g_xi [B, P]
    gh = linear(g_xi, w_if, g.h)
    g_pre, g_c = kern.cell.cell_backward(gh, g.c, *lstm_t)
    g_in = linear(g_pre, w_in)  # [B, R W + C]
    RW = cfg.read_heads * cfg.word_size
    grads = Grads(gM, g_wr_prev, g_ww_prev, gp, g_u_prev, g_in[:, :RW], g_in[:, RW:], g_c)
    return grads, g_pre, g_xi


# ----------------------------------------------------------------------------------------------------------------
# The sequence


class DNCSequence(torch.autograd.Function):
    """Logits [B, T, O] from x, the initial state and the weights."""

    @staticmethod
    def forward(ctx, model, x, *inputs):
        y, saved = dnc_loop(model, x, *inputs, save=True)
        ctx.model, ctx.layout = model, saved["layout"]
        ctx.save_for_backward(*saved["tensors"])
        return y

    @staticmethod
    def backward(ctx, gy):
        return (None, *dnc_backward(ctx, gy))


STATE_FIELDS = ("memory", "read_weights", "write_weights", "link", "precedence", "usage", "reads")


PARAM_NAMES = ("controller.weight_ih", "controller.weight_hh", "controller.bias_ih", "controller.bias_hh",
               "interface.weight", "interface.bias", "output.weight", "output.bias")


def param_names(model) -> tuple[str, ...]:
    """The names of the weights DNCSequence differentiates, in its order."""
    return PARAM_NAMES


def dnc_params(model) -> tuple[Tensor, ...]:
    return tuple(model.get_parameter(name) for name in PARAM_NAMES)


def dnc_loop(model, x, memory, read_w, write_w, link, precedence, usage, reads, h, c, *params, save: bool):
    """The forward over x [B, T, I]; with ``save`` also what :func:`dnc_backward` needs."""
    clip = model.cfg.clip_value
    B, T, I = x.shape
    w_ih, w_hh, b_ih, b_hh, w_if, b_if, w_out, b_out = params
    w_rec = torch.cat([w_ih[..., I:], w_hh], dim=-1).mT  # [R W + C, 4C] (or [S, ...]: see mann.fast_shared.linear)
    # the input's share of the controller pre-activations, every step in one matmul
    xproj = linear(x, w_ih[..., :I].mT, b_ih + b_hh)  # [B, T, 4C]
    state = Carry(memory, read_w, write_w, precedence, usage, reads.reshape(B, -1), h, c)
    links = LinkHistory(link, T, save)
    steps, hs, rs = [], [], []
    kern = step_kernels()
    w_if_t = w_if.mT
    xps = xproj.unbind(1)  # one op for the per-step views
    for t in range(T):
        state, step_saved = dnc_step(model, t, xps[t], state, links, w_rec, w_if_t, b_if, kern)
        if save:
            steps.append(step_saved)
        hs.append(state.h), rs.append(state.reads)
    H_all, R_all = torch.stack(hs, dim=1), torch.stack(rs, dim=1)  # [B, T, C], [B, T, R W]
    hr = torch.cat([H_all, R_all], dim=2)
    y_raw = linear(hr, w_out.mT, b_out)  # output layer, every step at once
    y = y_raw if clip is None else y_raw.clamp(-clip, clip)
    if not save:
        return y, None
    flat = [st[k] for st in steps for k in KERNEL_SAVED]  # through save_for_backward: saved-tensor hooks count it
    batched = [x, memory, read_w, write_w, link, precedence, usage, reads, h, c, H_all, R_all, hr, y_raw]
    layout = dict(batched=len(batched), links=len(links.kept), every=links.every, T=T)
    return y, {"tensors": [*batched, *links.kept, *flat, *params], "layout": layout}


def dnc_backward(ctx, gy: Tensor):
    model, lay = ctx.model, ctx.layout
    saved = ctx.saved_tensors
    nb, nl, T = lay["batched"], lay["links"], lay["T"]
    x, memory, read_w, write_w, link, precedence, usage, reads, h0, c0, H_all, R_all, hr, y_raw = saved[:nb]
    kept = list(saved[nb : nb + nl])
    params = saved[-8:]
    per_step = saved[nb + nl : -8]
    n = len(KERNEL_SAVED)
    steps = [dict(zip(KERNEL_SAVED, per_step[i * n : (i + 1) * n], strict=True)) for i in range(T)]
    w_ih, w_hh, _b_ih, _b_hh, w_if, _b_if, w_out, _b_out = params
    B, _, I = x.shape
    C = H_all.shape[2]
    w_in = torch.cat([w_ih[..., I:], w_hh], dim=-1)  # the controller's weight on [r_{t-1}, h_{t-1}]
    g_hr, g_w_out, g_b_out = output_backward(gy, y_raw, hr, w_out, model.cfg.clip_value)
    gh_out, gr_out = g_hr[..., :C].unbind(1), g_hr[..., C:].unbind(1)
    kern = step_kernels()
    c_prev = [c0, *(s["c"] for s in steps[:-1])]
    # the fused cell backward takes (act, c_{t-1}, tanh(c_t)) as they are
    lstm_consts = [(s["act"], c, s["tanh_c"]) for s, c in zip(steps, c_prev, strict=True)]

    z = torch.zeros_like
    g = Grads(z(memory), z(read_w), z(write_w), z(precedence), z(usage), x.new_zeros(B, reads[0].numel()),
              z(h0), z(c0))
    gL = z(link)
    pairs = LinkHistory.reverse(kept, lay["every"], T, [s["write_w"] for s in steps],
                                [s["precedence_prev"] for s in steps], kern.step.link_step)
    g_pres, g_xis = [], []
    for t, L_prev in pairs:
        g = g._replace(reads=g.reads + gr_out[t], h=g.h + gh_out[t])
        g, g_pre, g_xi = dnc_step_backward(model, g, gL, steps[t], L_prev, lstm_consts[t], w_in, w_if, kern)
        g_pres.append(g_pre), g_xis.append(g_xi)

    # weight gradients, every step in one matmul
    g_pre, g_xi = torch.stack(g_pres[::-1], dim=1), torch.stack(g_xis[::-1], dim=1)  # [B, T, 4C], [B, T, P]
    r_prev = torch.cat([reads.reshape(B, 1, -1), R_all[:, :-1]], dim=1)
    g_w_ih = weight_grad(g_pre, torch.cat([x, r_prev], dim=2), w_ih)
    g_w_hh = weight_grad(g_pre, torch.cat([h0[:, None], H_all[:, :-1]], dim=1), w_hh)
    g_bias = bias_grad(g_pre, w_ih)
    g_x = linear(g_pre, w_ih[..., :I]) if ctx.needs_input_grad[1] else None
    return (g_x, g.memory, g.read_w, g.write_w, gL, g.precedence, g.usage, g.reads.view_as(reads), g.h, g.c,
            g_w_ih, g_w_hh, g_bias, g_bias, weight_grad(g_xi, H_all, w_if), bias_grad(g_xi, w_if), g_w_out, g_b_out)


def dnc_forward(model, x: Tensor, state=None, memory_size: int | None = None, params=None) -> Tensor:
    """DNC.forward through the fused path: x [B, T, I] -> logits [B, T, O]. ``params``: the weights to use instead of
    the model's, in :func:`param_names`' order, each as the model's or stacked per seed (fast_shared.linear)."""
    if state is None:
        state = model.initial_state(x.shape[0], memory_size)
    params = dnc_params(model) if params is None else tuple(params)
    h, c = state.controller
    inputs = tuple(t.contiguous() for t in (x, *(getattr(state, f) for f in STATE_FIELDS), h, c))
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *params))):
        with torch.no_grad():
            return dnc_loop(model, *inputs, *params, save=False)[0]
    return DNCSequence.apply(model, *inputs, *params)
