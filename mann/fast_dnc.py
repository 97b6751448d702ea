"""Fast path of the DNC (mann.dnc.DNC): the whole sequence as one autograd node with a hand-written backward.

Same approach as :mod:`mann.fast` (read its docstring first): the forward loop runs without autograd and keeps
what the backward needs; the backward walks the steps in reverse, mechanism by mechanism, in the reverse of
``DNC.step``'s order; weight gradients are one matmul over all steps.

The temporal link matrix L is [B, Hw, N, N] per step. The reference's autograd graph keeps several N x N
tensors per step (L_{t-1}, the decay factor 1 - w_i - w_j, the new link before its diagonal is cleared, ...).
The backward needs only L_t (it is L_{t-1} of the next step), so that is all that is kept (see
:class:`LinkHistory`); the decay factor is recomputed. Each N x N op is a full pass over B * N^2 numbers, so
they are counted: per step 3 passes to update L and 2 to read it forward; about 10 backward (3 more where
links are recomputed between kept copies).

On CPU (float32/64) steps 2-6 of each time step and their reverse run as one call each into mann/csrc/dnc_step.cpp
(:func:`step_kernels`; every option of DNCConfig runs there): the ~150 small ops per step fwd+bwd here cost ~3-7 us
each, and the kernel makes one pass over L per step forward (update and both directional weightings) and one
backward (reading L_{t-1} only: it recomputes L_t's rows). The ops below are what runs elsewhere (CUDA, no compiler).

Symbols: psi retention, u usage, a allocation, c^w / c^r content weightings, w^w / w^r write and read
weightings, p precedence, f / b forward and backward weightings, pi read modes (DNC Methods).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mann.fast import (
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
    prod_others,
    softmax_backward,
    unflatten_tree,
    weight_grad,
    write_backward,
    write_forward,
)

LINK_EPS = 1e-6  # mann.addressing.sharpen_link_distribution's eps


# ----------------------------------------------------------------------------------------------------------------
# Mechanisms: forward and backward, no autograd


def allocation_forward(usage: Tensor) -> tuple[Tensor, tuple]:
    """a[phi[j]] = (1 - u[phi[j]]) prod_{i<j} u[phi[i]], phi sorting u ascending (stable, as the reference).

    usage: [B, N] -> ([B, N], saved).
    """
    sorted_usage, phi = torch.sort(usage, dim=-1, stable=True)
    prod_before = torch.cumprod(F.pad(sorted_usage[:, :-1], (1, 0), value=1.0), dim=-1)
    a = torch.empty_like(usage).scatter_(-1, phi, (1 - sorted_usage) * prod_before)
    return a, (sorted_usage, phi, prod_before)


def allocation_backward(ga: Tensor, saved: tuple) -> Tensor:
    """Gradient of the usage [B, N] from that of the allocation; the sort permutation is a constant."""
    u, phi, P = saved
    ga = ga.gather(-1, phi)
    gP = ga * (1 - u)
    # P_j = prod_{i<j} u_i, so dL/du_j = sum_{k>j} gP_k prod_{i<k, i != j} u_i.
    # j = 0: prod_{0<i<k} u_i = P_k / u_0, computed as the cumulative product of u_1.. (no division).
    # j > 0: (sum_{k>j} gP_k P_k) / u_j where u_j > 0. u is sorted ascending, so if u_j = 0 (j > 0) then u_0 = 0
    # too, every term of the sum holds the factor u_0: the sum is exactly 0, and so is 0 / (u_j floored).
    P_without_first = torch.cumprod(F.pad(u[:, 1:-1], (1, 0), value=1.0), dim=-1)  # prod_{0<i<k} u_i, k >= 1
    g_first = (gP[:, 1:] * P_without_first).sum(-1, keepdim=True)
    gPP = gP * P
    after = gPP.flip(-1).cumsum(-1).flip(-1) - gPP  # sum_{k>j} gP_k P_k
    g_rest = after[:, 1:] / u[:, 1:].clamp_min(torch.finfo(u.dtype).tiny)
    gu = torch.cat([g_first, g_rest], dim=-1).addcmul_(ga, P, value=-1)
    return torch.empty_like(gu).scatter_(-1, phi, gu)


def sharpen_forward(d: Tensor, s: Tensor) -> tuple[Tensor, tuple]:
    """S(d, s) = softmax(s log(d + eps)) (Csordás & Schmidhuber 2019, Eq. 2). d: [B, R, Hw, N]; s: [B, R]."""
    log_d = torch.log(d + LINK_EPS)
    y = torch.softmax(s[:, :, None, None] * log_d, dim=-1)
    return y, (log_d, d, s, y)


def sharpen_backward(gy: Tensor, saved: tuple) -> tuple[Tensor, Tensor]:
    log_d, d, s, y = saved
    gz = softmax_backward(y, gy)
    return gz * s[:, :, None, None] / (d + LINK_EPS), (gz * log_d).sum((-1, -2))


LINK_KEEP_BYTES = 24 * 2**20  # keep every L_t while they all fit in this (about the L3 cache); else checkpoint


def link_update(L_prev: Tensor, ww: Tensor, p_prev: Tensor, out: Tensor, decay: Tensor) -> Tensor:
    """L_t = (1 - w_i - w_j) L_{t-1} + w_i p_{t-1, j}, diagonal 0, written into ``out`` (may be ``L_prev``).

    L: [B, Hw, N, N]; ww w^w_t, p_prev: [B, Hw, N]; ``decay`` is an [B, Hw, N, N] scratch buffer. Three passes
    over N x N, no allocation (the reference allocates several N x N tensors per step).
    """
    w_i = ww[..., :, None]
    torch.sub(1 - w_i, ww[..., None, :], out=decay)
    torch.mul(L_prev, decay, out=out)
    out.addcmul_(w_i, p_prev[..., None, :])
    out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


def link_backward(gL: Tensor, L_prev: Tensor, ww: Tensor, p_prev: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """Back through :func:`link_update`: ``gL`` (of L_t, diagonal already cleared) becomes that of L_{t-1}, in
    place; returns the gradients of w^w_t and p_{t-1}, [B, Hw, N] each. ``scratch``: an N x N buffer.

    dL/dw_i = sum_j gL[i, j] (p_j - L_{t-1}[i, j]) - sum_j gL[j, i] L_{t-1}[j, i];  dL/dp_j = sum_i gL[i, j] w_i.
    With X = gL * (p_j - L_{t-1}) the second sum is p_i colsum(gL)_i - colsum(X)_i: sums, which ran faster here
    than a matrix product with L_{t-1} (and than stacking [1; w] into one bmm for colsum(gL) and w^T gL).
    """
    B, Hw, N = ww.shape
    torch.sub(p_prev[..., None, :], L_prev, out=scratch).mul_(gL)
    g_p = torch.bmm(ww.view(B * Hw, 1, N), gL.view(B * Hw, N, N)).view(B, Hw, N)  # w^T gL
    g_ww = torch.addcmul(scratch.sum(-1) + scratch.sum(-2), p_prev, gL.sum(-2), value=-1)
    torch.sub(1 - ww[..., :, None], ww[..., None, :], out=scratch)
    gL.mul_(scratch)
    return g_ww, g_p


def directional(L: Tensor, read_prev: Tensor) -> tuple[Tensor, Tensor]:
    """f = L_t w^r_{t-1} and b = L_t^T w^r_{t-1} per read and write head: L [B, Hw, N, N], read_prev [B, R, N]
    -> ([B, R, Hw, N], [B, R, Hw, N]). One bmm each over B * Hw (a broadcast matmul would copy L)."""
    B, Hw, N, _ = L.shape
    R = read_prev.shape[1]
    flat = L.view(B * Hw, N, N)
    w = read_prev if Hw == 1 else read_prev[:, None].expand(B, Hw, R, N).reshape(B * Hw, R, N)
    # f^T = w L^T: a bmm on L's transposed view, which MKL reads directly; L w^T then transposed back needed a copy
    # and ran ~1.7x slower here (N = 64; 1.3x at N = 256)
    fwd = torch.bmm(w, flat.transpose(1, 2)).view(B, Hw, R, N).transpose(1, 2)
    bwd = torch.bmm(w, flat).view(B, Hw, R, N).transpose(1, 2)
    return fwd, bwd


def directional_backward(gL: Tensor, L: Tensor, read_prev: Tensor, g_fwd: Tensor, g_bwd: Tensor) -> Tensor:
    """Back through :func:`directional`: adds to ``gL`` [B, Hw, N, N] in place, returns the gradient of w^r_{t-1}.

    f[r, i] = sum_j L[i, j] w[r, j] and b[r, i] = sum_j L[j, i] w[r, j], so
    dL += g_f^T w + w^T g_b (one bmm over [g_f, w] and [w, g_b]) and dw = g_f L + g_b L^T.
    """
    B, Hw, N, _ = L.shape
    R = read_prev.shape[1]
    flat, g_flat = L.view(B * Hw, N, N), gL.view(B * Hw, N, N)
    gf = g_fwd.transpose(1, 2).reshape(B * Hw, R, N)
    gb = g_bwd.transpose(1, 2).reshape(B * Hw, R, N)
    w = read_prev if Hw == 1 else read_prev[:, None].expand(B, Hw, R, N).reshape(B * Hw, R, N)
    g_flat.baddbmm_(torch.cat([gf, w], dim=1).transpose(1, 2), torch.cat([w, gb], dim=1))
    g_read = torch.bmm(gf, flat) + torch.bmm(gb, flat.transpose(1, 2))  # [B Hw, R, N]
    return g_read.view(B, Hw, R, N).sum(1)


class LinkHistory:
    """The link matrices L_t of one sequence, [B, Hw, N, N] each: what the backward needs, and no more.

    Forward keeps one L, updated in place. If all T of them fit in LINK_KEEP_BYTES a copy of each is kept;
    otherwise a copy every ``every`` ~ sqrt(T) steps, and the backward recomputes the steps between from the
    (small) w^w_t and p_{t-1}: a few passes over a working set that stays in cache, instead of T matrices
    in main memory (N = 256, B = 16, T = 41: 172 MB).
    """

    def __init__(self, link0: Tensor, steps: int, save: bool):
        self.decay = None  # the ops path's scratch buffer, made on first use (the kernel needs none)
        nbytes = link0.numel() * link0.element_size()
        self.every = 1 if steps * nbytes <= LINK_KEEP_BYTES else max(2, round(math.sqrt(steps)))
        self.steps, self.save = steps, save
        self.keep_all = save and self.every == 1  # then each L_t is a new tensor (kept), else one buffer
        self.L = link0 if self.keep_all else link0.clone()
        self.kept = [link0] if save else []  # every == 1: L_{-1}, L_0, ...; else L_{-1}, L_{k-1}, L_{2k-1}, ...

    def step(self, t: int, ww: Tensor, p_prev: Tensor) -> Tensor:
        """L_t (unless every L_t is kept, the internal buffer: read it before the next step)."""
        L_prev, out = self.buffers()
        if self.decay is None:
            self.decay = torch.empty_like(L_prev)
        return self.record(t, link_update(L_prev, ww, p_prev, out, self.decay))

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
    def reverse(kept: list[Tensor], every: int, steps: int, write_w: list[Tensor], p_prev: list[Tensor],
                update=None):
        """Yield (t, L_t, L_{t-1}) for t = T-1 .. 0, recomputing between kept copies when ``every`` > 1.

        ``update(L_prev, ww, p_prev, out)``: the link update to recompute with (the fused kernel's, whose
        backward reads only L_{t-1}: then L_t is not recomputed where it is not kept, and comes as None).
        """
        if every == 1:
            for t in range(steps - 1, -1, -1):
                yield t, kept[t + 1], kept[t]
            return
        current = update is None  # the ops path reads L_t too
        if update is None:
            decay = torch.empty_like(kept[0])

            def update(L, ww, p, out):
                return link_update(L, ww, p, out, decay)

        buffers = [torch.empty_like(kept[0]) for _ in range(every if current else every - 1)]
        for j in range(len(kept) - 1, -1, -1):
            start, end = j * every, min((j + 1) * every, steps)
            prev = kept[j]
            for t in range(start, end if current else end - 1):
                prev = update(prev, write_w[t], p_prev[t], buffers[t - start])
            for t in range(end - 1, start - 1, -1):
                L_t = buffers[t - start] if current or t < end - 1 else None
                yield t, L_t, buffers[t - start - 1] if t > start else kept[j]


# ----------------------------------------------------------------------------------------------------------------
# The interface vector


PART_KINDS = {  # squashing of each part of xi_t: 0 none, 1 sigmoid, 2 oneplus, 3 sigmoid floored at cfg.mask_min
    # (mann.dnc.floored_mask); softmax parts: 0, handled apart
    "read_keys": 0, "read_strengths": 2, "write_keys": 0, "write_strengths": 2, "erase": 1, "write_vectors": 0,
    "free_gates": 1, "alloc_gates": 1, "write_gates": 1, "read_modes": 0, "read_masks": 3, "write_masks": 3,
    "forward_sharpness": 2, "backward_sharpness": 2,
}


def part_names(cfg) -> list[str]:
    """The parts of xi_t in DNC.interface_sizes' order."""
    names = ["read_keys", "read_strengths", "write_keys", "write_strengths", "erase", "write_vectors", "free_gates",
             "alloc_gates", "write_gates", "read_modes"]
    if cfg.masking:
        names += ["read_masks", "write_masks"]
    if cfg.sharpness:
        names += ["forward_sharpness", "backward_sharpness"]
    return names


def interface_parts(model, xi: Tensor) -> dict[str, Tensor]:
    """Split and squash the (clipped) interface vector xi [B, P] as DNC.step does."""
    cfg = model.cfg
    B, R, Hw, W = xi.shape[0], cfg.read_heads, cfg.write_heads, cfg.word_size
    shapes = {"read_keys": (R, W), "write_keys": (Hw, W), "erase": (Hw, W), "write_vectors": (Hw, W),
              "read_masks": (R, W), "write_masks": (Hw, W), "read_modes": (R, 2 * Hw + 1),
              "read_strengths": (R, 1), "write_strengths": (Hw, 1)}
    sig = torch.sigmoid(xi)
    oneplus = 1 + F.softplus(xi)
    mm = cfg.mask_min
    floored = sig if mm == 0 else mm + (1 - mm) * sig
    raw_parts = torch.split(xi, model.interface_sizes, dim=1)
    squashed = {kind: torch.split(v, model.interface_sizes, dim=1)
                for kind, v in ((1, sig), (2, oneplus), (3, floored))}
    out = dict.fromkeys(["read_masks", "write_masks", "forward_sharpness", "backward_sharpness"])  # absent: None
    for k, name in enumerate(part_names(cfg)):
        kind = PART_KINDS[name]
        part = raw_parts[k] if kind == 0 else squashed[kind][k]
        out[name] = part.view(B, *shapes[name]) if name in shapes else part
    out["read_modes"] = torch.softmax(out["read_modes"], dim=-1)  # pi_t over (backward heads, content, forward heads)
    return out


def interface_derivative(model, raws: Tensor) -> Tensor:
    """d(squashed)/d(raw xi) for every step, [T, B, P], times the clip's pass-through. The read modes' softmax
    backward is applied in the loop (1 here)."""
    clip = model.cfg.clip_value
    p = raws if clip is None else raws.clamp(-clip, clip)
    sig = torch.sigmoid(p)
    kinds = [PART_KINDS[n] for n, size in zip(part_names(model.cfg), model.interface_sizes, strict=True)
             for _ in range(size)]
    kind = torch.tensor(kinds, device=raws.device)
    d_oneplus = torch.where(p > SOFTPLUS_THRESHOLD, torch.ones_like(p), sig)
    d_sig = sig * (1 - sig)
    d = torch.where(kind == 1, d_sig, torch.where(kind == 2, d_oneplus, torch.ones_like(p)))
    d = torch.where(kind == 3, (1 - model.cfg.mask_min) * d_sig, d)
    return d * clip_pass(raws, clip)


# ----------------------------------------------------------------------------------------------------------------
# One step and its reverse


# What the fused step's backward reads, per time step: tensors only, in this order (flattened without a tree walk)
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
    mem_norm: Tensor | None = None  # |M[i]| [B, 1, N] when the last content read computed it (no masks), else None


def dnc_step(model, t: int, xp: Tensor, s: Carry, links: LinkHistory, w_rec: Tensor, w_if_t: Tensor, b_if: Tensor,
             kern=None):
    """DNC.step without autograd. xp: [B, 4C], the input's share of the controller pre-activations; w_if_t: the
    interface weight transposed, [C, P] (or [S, C, P]). ``kern``: the
    fused kernels (:func:`step_kernels`) to run the LSTM update and steps 2-6 with, or None for the PyTorch ops.

    Returns (next Carry, saved): saved is what :func:`dnc_step_backward` needs.
    """
    cfg = model.cfg
    R, Hw, W, clip = cfg.read_heads, cfg.write_heads, cfg.word_size, cfg.clip_value
    B = xp.shape[0]
    # 1. controller on [x_t, r_{t-1}]
    pre = linear(torch.cat([s.reads, s.h], dim=1), w_rec, xp)
    h, c, act, tanh_c = lstm_forward(pre, s.c) if kern is None else kern.cell.cell_forward(pre, s.c)
    # 2. interface vector xi_t
    raw = linear(h, w_if_t, b_if)
    if kern is not None:  # steps 2-6 in one call: same maths, see mann/csrc/dnc_step.cpp
        L_prev, L_out = links.buffers()
        M, wr, ww, p, u, r, aux = kern.step.step_forward(
            raw, s.memory, s.read_w, s.write_w, s.precedence, s.usage, L_prev, L_out, R, Hw, cfg.masking,
            cfg.deallocation, cfg.sharpness, clip or 0.0, cfg.mask_min)
        links.record(t, L_out)
        saved = dict(zip(KERNEL_SAVED, (raw, act, c, tanh_c, s.memory, s.read_w, s.write_w, s.precedence, s.usage, M,
                                        wr, ww, aux), strict=True))
        return Carry(M, wr, ww, p, u, r, h, c), saved
    q = interface_parts(model, raw if clip is None else raw.clamp(-clip, clip))
    # 3. allocation from the previous weightings: psi_t, u_t, a_t
    psi_factors = 1 - q["free_gates"][..., None] * s.read_w  # [B, R, N]
    psi = torch.prod(psi_factors, dim=1)
    # several write heads act as one write weighting 1 - prod_h (1 - w^w_h)
    written = s.write_w[:, 0] if Hw == 1 else 1 - torch.prod(1 - s.write_w, dim=1)
    unused = 1 - s.usage
    usage_inner = torch.addcmul(s.usage, written, unused)  # u + w - u w
    u = usage_inner * psi
    share = q["write_gates"] * q["alloc_gates"]  # g^w g^a: how much of each head's write goes via allocation
    alloc_usages, alloc_saved, allocs = [], [], []
    uh = u
    for k in range(Hw):
        a, a_saved = allocation_forward(uh)
        alloc_usages.append(uh), alloc_saved.append(a_saved), allocs.append(a)
        if k < Hw - 1:  # the next head allocates after this one's write
            uh = uh + (1 - uh) * share[:, k, None] * a
    alloc = allocs[0][:, None] if Hw == 1 else torch.stack(allocs, dim=1)  # [B, Hw, N]
    # 4. write weighting, (de-allocation,) erase and add
    cw, cw_saved = content_forward(s.memory, q["write_keys"], q["write_strengths"], q["write_masks"], s.mem_norm)
    write_inner = torch.lerp(cw, alloc, q["alloc_gates"][..., None])  # g^a a + (1 - g^a) c^w
    ww = q["write_gates"][..., None] * write_inner
    M_written = s.memory * psi[..., None] if cfg.deallocation else s.memory  # the memory the write acts on
    M, write_saved = write_forward(M_written, ww, q["erase"], q["write_vectors"])
    # 5. temporal links (from p_{t-1}), precedence, directional weightings (from w^r_{t-1})
    L = links.step(t, ww, s.precedence)
    p_keep = 1 - ww.sum(-1, keepdim=True)  # [B, Hw, 1]: how much of p_{t-1} the write leaves
    p = torch.addcmul(ww, p_keep, s.precedence)
    fwd_raw, bwd_raw = directional(L, s.read_w)
    fwd, bwd, fwd_saved, bwd_saved = fwd_raw, bwd_raw, None, None
    if cfg.sharpness:
        fwd, fwd_saved = sharpen_forward(fwd_raw, q["forward_sharpness"])
        bwd, bwd_saved = sharpen_forward(bwd_raw, q["backward_sharpness"])
    # 6. read weighting from b, c^r (on M_t), f by the read modes; read
    cr, cr_saved = content_forward(M, q["read_keys"], q["read_strengths"], q["read_masks"])
    modes_stack = torch.cat([bwd, cr[:, :, None], fwd], dim=2)  # [B, R, 2 Hw + 1, N], in the modes' order
    wr = (q["read_modes"][:, :, None, :] @ modes_stack).squeeze(2)
    r = torch.bmm(wr, M).view(B, R * W)
    saved = dict(
        raw=raw, act=act, c=c, tanh_c=tanh_c, parts=q, prev=s._replace(h=None, c=None, reads=None, mem_norm=None),
        psi_factors=psi_factors, psi=psi, written=written, unused=unused, usage_inner=usage_inner, p_keep=p_keep,
        alloc_usages=alloc_usages, alloc_saved=alloc_saved, alloc=alloc, write_content=cw_saved,
        write_inner=write_inner, write_w=ww,
        write=write_saved, forward_sharp=fwd_saved, backward_sharp=bwd_saved, modes_stack=modes_stack,
        read_content=cr_saved, read_w=wr,
    )
    mem_norm = cr_saved[4] if q["read_masks"] is None else None  # the next step's write addressing reuses |M_t[i]|
    return Carry(M, wr, ww, p, u, r, h, c, mem_norm), saved


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


def dnc_step_backward(model, g: Grads, gL: Tensor, s: dict, L_t: Tensor | None, L_prev: Tensor, d_xi: Tensor | None,
                      lstm_t: tuple, w_in: Tensor, w_if: Tensor, scratch: Tensor | None, kern=None):
    """The reverse of :func:`dnc_step`: gradients w.r.t. its outputs (``g``, and ``gL`` w.r.t. L_t, updated in place
    to w.r.t. L_{t-1}) -> gradients w.r.t. its inputs, and those of the controller pre-activations [B, 4C] and of
    the raw interface vector [B, P]. With ``kern`` (the forward ran it) steps 6-2 are one call that reads only
    L_{t-1} and applies the interface's derivatives itself (``L_t``, ``d_xi`` and ``scratch`` unused), and
    ``lstm_t`` is (act, c_{t-1}, tanh(c_t)) for the fused cell backward."""
    cfg = model.cfg
    R, Hw, W = cfg.read_heads, cfg.write_heads, cfg.word_size
    if kern is not None:
        gM, g_wr_prev, g_ww_prev, gp, g_u_prev, g_xi = kern.step.step_backward(
            s["raw"], s["memory_prev"], s["memory"], s["read_w_prev"], s["write_w_prev"], s["precedence_prev"],
            s["usage_prev"], L_prev, s["read_w"], s["write_w"], s["aux"], g.memory, g.read_w, g.write_w,
            g.precedence, g.usage, g.reads.contiguous(), gL, R, Hw, cfg.masking, cfg.deallocation, cfg.sharpness,
            cfg.clip_value or 0.0, cfg.mask_min)
        return _controller_backward(g, g_xi, gM, g_wr_prev, g_ww_prev, gp, g_u_prev, lstm_t, w_in, w_if, R * W,
                                    kern.cell)
    q, prev = s["parts"], s["prev"]
    B = g.h.shape[0]
    gq = {}  # gradients w.r.t. the squashed interface parts
    wr, ww, wr_prev, p_prev = s["read_w"], s["write_w"], prev.read_w, prev.precedence
    M_t = s["read_content"][0]
    gr = g.reads.view(B, R, W)
    # 6. read r = w^r M_t; read weighting w^r = pi . (b, c^r, f)
    g_wr = torch.baddbmm(g.read_w, gr, M_t.transpose(1, 2))
    gM = torch.baddbmm(g.memory, wr.transpose(1, 2), gr)
    modes = q["read_modes"]
    gq["read_modes"] = softmax_backward(modes, (s["modes_stack"] * g_wr[:, :, None, :]).sum(-1))
    g_stack = modes[..., None] * g_wr[:, :, None, :]
    g_bwd, g_cr, g_fwd = g_stack[:, :, :Hw], g_stack[:, :, Hw], g_stack[:, :, Hw + 1 :]
    gM, gq["read_keys"], gq["read_strengths"], gq["read_masks"] = content_backward(g_cr, s["read_content"], gM)
    if cfg.sharpness:
        g_fwd, gq["forward_sharpness"] = sharpen_backward(g_fwd, s["forward_sharp"])
        g_bwd, gq["backward_sharpness"] = sharpen_backward(g_bwd, s["backward_sharp"])
    # 5. directional weightings, precedence p_t = (1 - sum w^w) p_{t-1} + w^w, link
    g_wr_prev = directional_backward(gL, L_t, wr_prev, g_fwd, g_bwd)
    gL.diagonal(dim1=-2, dim2=-1).zero_()  # L_t's diagonal is cleared: no gradient flows through it
    g_ww = g.write_w + g.precedence - (g.precedence * p_prev).sum(-1, keepdim=True)
    g_ww_link, gp_link = link_backward(gL, L_prev, ww, p_prev, scratch)
    g_ww, gp = g_ww + g_ww_link, torch.addcmul(gp_link, s["p_keep"], g.precedence)
    # 4. write M_t = M' * prod_h (1 - w_h e_h^T) + w^T v, with M' = M_{t-1} (* psi with de-allocation)
    gM, g_ww_write, gq["erase"], gq["write_vectors"] = write_backward(gM, s["write"])
    g_ww = g_ww + g_ww_write
    g_psi = None  # of the retention psi_t, from the de-allocation (if any) and the usage below
    if cfg.deallocation:
        g_psi = (gM * prev.memory).sum(-1)
        gM = gM * s["psi"][..., None]
    # write weighting w^w = g^w (g^a a + (1 - g^a) c^w)
    ga, gw = q["alloc_gates"], q["write_gates"]
    gq["write_gates"] = (g_ww * s["write_inner"]).sum(-1)
    g_inner = g_ww * gw[..., None]
    gq["alloc_gates"] = (g_inner * (s["alloc"] - s["write_content"][7])).sum(-1)  # [7]: c^w
    g_alloc = g_inner * ga[..., None]
    gM, gq["write_keys"], gq["write_strengths"], gq["write_masks"] = content_backward(
        g_inner - g_alloc, s["write_content"], gM)
    # 3. allocation: u^(k+1) = u^(k) + (1 - u^(k)) g^w_k g^a_k a_k with a_k = alloc(u^(k)), u^(0) = u_t
    g_u = allocation_backward(g_alloc[:, Hw - 1], s["alloc_saved"][Hw - 1])  # nothing reads the last head's usage
    if Hw > 1:
        share = gw * ga
        g_share = torch.zeros_like(share)
        for k in range(Hw - 2, -1, -1):  # g_u: w.r.t. the usage after head k
            uk, ak = s["alloc_usages"][k], s["alloc"][:, k]
            g_ak = g_alloc[:, k] + g_u * (1 - uk) * share[:, k, None]
            g_share[:, k] = (g_u * (1 - uk) * ak).sum(-1)
            g_u = g_u * (1 - share[:, k, None] * ak) + allocation_backward(g_ak, s["alloc_saved"][k])
        gq["write_gates"] = gq["write_gates"] + g_share * ga
        gq["alloc_gates"] = gq["alloc_gates"] + g_share * gw
    g_u = g_u + g.usage
    # usage u_t = (u_{t-1} + w - u_{t-1} w) psi_t, with w = 1 - prod_h (1 - w^w_{t-1,h})
    g_psi = g_u * s["usage_inner"] if g_psi is None else torch.addcmul(g_psi, g_u, s["usage_inner"])
    g_inner_u = g_u * s["psi"]
    g_written = g_inner_u * s["unused"]
    g_u_prev = torch.addcmul(g_inner_u, g_inner_u, s["written"], value=-1)  # * (1 - w)
    g_ww_prev = g_written[:, None] if Hw == 1 else g_written[:, None] * prod_others(1 - prev.write_w, 1)
    # retention psi_t = prod_r (1 - f_r w^r_{t-1,r})
    g_factors = g_psi[:, None] * prod_others(s["psi_factors"], 1)  # [B, R, N]
    gq["free_gates"] = -(g_factors * wr_prev).sum(-1)
    g_wr_prev = torch.addcmul(g_wr_prev, g_factors, q["free_gates"][..., None], value=-1)
    # 2. the interface vector, in its layout
    g_xi = torch.cat([gq[n].reshape(B, -1) for n in part_names(cfg)], dim=1) * d_xi
    return _controller_backward(g, g_xi, gM, g_wr_prev, g_ww_prev, gp, g_u_prev, lstm_t, w_in, w_if, R * W)


def _controller_backward(g: Grads, g_xi: Tensor, gM: Tensor, g_wr_prev: Tensor, g_ww_prev: Tensor, gp: Tensor,
                         g_u_prev: Tensor, lstm_t: tuple, w_in: Tensor, w_if: Tensor, RW: int, cell=None):
    """Step 1's reverse, from the raw interface's gradient g_xi [B, P]: (Grads of step t's inputs, g_pre, g_xi).
    w_in: the controller's weight on [r_{t-1}, h_{t-1}], [4C, R W + C] (or stacked per seed); ``cell``: the fused
    LSTM cell (mann/csrc/lstm_cell.cpp), or None for the PyTorch ops."""
    gh = linear(g_xi, w_if, g.h)
    g_pre, g_c = lstm_step_backward(gh, g.c, *lstm_t) if cell is None else cell.cell_backward(gh, g.c, *lstm_t)
    g_in = linear(g_pre, w_in)  # [B, R W + C]
    grads = Grads(gM, g_wr_prev, g_ww_prev, gp, g_u_prev, g_in[:, :RW], g_in[:, RW:], g_c)
    return grads, g_pre, g_xi


# ----------------------------------------------------------------------------------------------------------------
# The sequence


class Kernels(NamedTuple):
    """mann/csrc's fused CPU kernels the DNC step uses (built by mann.native)."""

    step: object  # dnc_step.cpp: everything after the interface vector
    cell: object  # lstm_cell.cpp: the LSTM update from its pre-activations


def step_kernels(x: Tensor) -> Kernels | None:
    """The fused kernels where they run for ``x`` (CPU, float32/64) and could be built, else None."""
    modules = fused_kernels(x, "dnc_step", "lstm_cell")
    return None if modules is None else Kernels(*modules)


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
    w_rec = torch.cat([w_ih[..., I:], w_hh], dim=-1).mT  # [R W + C, 4C] (or [S, ...]: see mann.fast.linear)
    # the input's share of the controller pre-activations, every step in one matmul
    xproj = linear(x, w_ih[..., :I].mT, b_ih + b_hh)  # [B, T, 4C]
    state = Carry(memory, read_w, write_w, precedence, usage, reads.reshape(B, -1), h, c)
    links = LinkHistory(link, T, save)
    steps, hs, rs = [], [], []
    kern = step_kernels(x)
    w_if_t = w_if.mT
    xps = xproj.unbind(1)  # one op for the per-step views
    with one_thread(x, max(link.numel(), memory.numel()), kern):
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
    # the kernels' per-step dicts hold tensors only: flattened in KERNEL_SAVED's order, no tree walk
    flat, spec = ([st[k] for st in steps for k in KERNEL_SAVED], None) if kern else flatten_tree(steps)
    batched = [x, memory, read_w, write_w, link, precedence, usage, reads, h, c, H_all, R_all, hr, y_raw]
    layout = dict(batched=len(batched), links=len(links.kept), every=links.every, spec=spec, T=T,
                  kernels=kern is not None)
    return y, {"tensors": [*batched, *links.kept, *flat, *params], "layout": layout}


def dnc_backward(ctx, gy: Tensor):
    model, lay = ctx.model, ctx.layout
    saved = ctx.saved_tensors
    nb, nl, T = lay["batched"], lay["links"], lay["T"]
    x, memory, read_w, write_w, link, precedence, usage, reads, h0, c0, H_all, R_all, hr, y_raw = saved[:nb]
    kept = list(saved[nb : nb + nl])
    params = saved[-8:]
    per_step = saved[nb + nl : -8]
    if lay["kernels"]:
        n = len(KERNEL_SAVED)
        steps = [dict(zip(KERNEL_SAVED, per_step[i * n : (i + 1) * n], strict=True)) for i in range(T)]
    else:
        steps = unflatten_tree(lay["spec"], per_step)
    w_ih, w_hh, _b_ih, _b_hh, w_if, _b_if, w_out, _b_out = params
    B, _, I = x.shape
    C = H_all.shape[2]
    w_in = torch.cat([w_ih[..., I:], w_hh], dim=-1)  # the controller's weight on [r_{t-1}, h_{t-1}]
    g_hr, g_w_out, g_b_out = output_backward(gy, y_raw, hr, w_out, model.cfg.clip_value)
    gh_out, gr_out = g_hr[..., :C].unbind(1), g_hr[..., C:].unbind(1)
    kern = step_kernels(x) if lay["kernels"] else None
    d_xi = [None] * T if kern else interface_derivative(model, torch.stack([s["raw"] for s in steps])).unbind(0)
    c_prev = [c0, *(s["c"] for s in steps[:-1])]
    if kern:  # the fused cell backward takes (act, c_{t-1}, tanh(c_t)) as they are
        lstm_consts = [(s["act"], c, s["tanh_c"]) for s, c in zip(steps, c_prev, strict=True)]
    else:
        lstm_consts = lstm_backward_constants(torch.stack([s["act"] for s in steps]), torch.stack(c_prev),
                                              torch.stack([s["tanh_c"] for s in steps]))

    z = torch.zeros_like
    g = Grads(z(memory), z(read_w), z(write_w), z(precedence), z(usage), x.new_zeros(B, reads[0].numel()),
              z(h0), z(c0))
    gL, scratch = z(link), None if kern else torch.empty_like(link)
    pairs = LinkHistory.reverse(kept, lay["every"], T, [s["write_w"] for s in steps],
                                [s["precedence_prev"] if kern else s["prev"].precedence for s in steps],
                                kern.step.link_step if kern else None)
    g_pres, g_xis = [], []
    with one_thread(x, max(link.numel(), memory.numel()), kern):
        for t, L_t, L_prev in pairs:
            g = g._replace(reads=g.reads + gr_out[t], h=g.h + gh_out[t])
            g, g_pre, g_xi = dnc_step_backward(model, g, gL, steps[t], L_t, L_prev, d_xi[t], lstm_consts[t], w_in,
                                               w_if, scratch, kern)
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
    """DNC.forward through the fast path: x [B, T, I] -> logits [B, T, O]. ``params``: the weights to use instead of
    the model's, in :func:`param_names`' order, each as the model's or stacked per seed (see mann.fast.linear)."""
    if state is None:
        state = model.initial_state(x.shape[0], memory_size)
    params = dnc_params(model) if params is None else tuple(params)
    h, c = state.controller
    inputs = tuple(t.contiguous() for t in (x, *(getattr(state, f) for f in STATE_FIELDS), h, c))
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *params))):
        with torch.no_grad():
            return dnc_loop(model, *inputs, *params, save=False)[0]
    return DNCSequence.apply(model, *inputs, *params)
