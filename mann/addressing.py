"""Memory addressing of the NTM and the DNC: one pure function per mechanism, named as in the papers.

Tensor in, tensor out, batch-first, no parameters and no Python loop over batch or heads (the one
exception, :func:`write_allocations`, loops over write heads because each head depends on the one before).
Shapes: B batch, N memory slots, W slot width, H heads of any kind, Hw write heads, R read heads,
S shift-kernel size.

Sources:
- NTM: Graves, Wayne & Danihelka (2014), "Neural Turing Machines", §3.3 (Eqs. 5-9).
- DNC: Graves et al. (2016), "Hybrid computing using a neural network with dynamic external memory",
  Methods ("Content-based addressing", "Dynamic memory allocation", "Temporal memory linkage").
- Csordás & Schmidhuber (2019), "Improving Differentiable Neural Computers Through Memory Masking,
  De-allocation, and Link Distribution Sharpness Control", ICLR 2019, §3.1 (masking) and §3.3 (sharpness).
  De-allocation (§3.2) is a memory operation: :func:`mann.memory.deallocate`.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The eps of each mechanism, as the papers' code has them; mann/csrc's kernels use the same values (tests/test_fast.py
# checks them by name).
CONTENT_EPS = 1e-6  # cosine similarity: k . M[i] / (|k| |M[i]| + eps)
SHARPEN_EPS = 1e-12  # NTM sharpening: softmax(gamma log(w + eps))
LINK_EPS = 1e-6  # link distribution sharpness: softmax(s log(d + eps))

# ----------------------------------------------------------------------------------------------------------------
# Content-based addressing (NTM §3.3.1; DNC Methods; masked form from Csordás & Schmidhuber §3.1)
# ----------------------------------------------------------------------------------------------------------------


def _norm_from_squares(squares: Tensor) -> Tensor:
    """sqrt of a sum of squares whose gradient stays finite at 0.

    sqrt'(0) is infinite, and an all-zero slot (the usual initial memory) would turn the backward pass into
    0 * inf = NaN. Below the smallest normal float the gradient is cut to 0 instead, a valid subgradient of |u|.
    """
    return squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt()


def cosine_similarity(memory: Tensor, keys: Tensor, mask: Tensor | None = None, eps: float = CONTENT_EPS) -> Tensor:
    """D(k, M[i]) = k . M[i] / (|k| |M[i]| + eps), for every head and slot.

    memory: [B, N, W]; keys: [B, H, W]; mask: [B, H, W] in [0, 1] or None -> [B, H, N].
    With ``mask`` m both sides are masked first, D(k * m, M[i] * m) (Csordás & Schmidhuber, §3.1).
    ``eps`` sits outside the product of norms, as in their D(u, v): an all-zero slot or key scores exactly 0,
    which is also what lets a de-allocated (zeroed) slot drop out of content look-up (their §3.2).
    """
    if mask is None:
        dot = torch.einsum("bhw,bnw->bhn", keys, memory)
        key_norm = _norm_from_squares(keys.square().sum(-1))  # [B, H]
        mem_norm = _norm_from_squares(memory.square().sum(-1))[:, None, :]  # [B, 1, N]
    else:
        # (k*m).(M[i]*m) = sum_w k_w m_w^2 M[i]_w: no [B, H, N, W] masked copy of the memory is needed
        m2 = mask.square()
        dot = torch.einsum("bhw,bnw->bhn", keys * m2, memory)
        key_norm = _norm_from_squares((keys.square() * m2).sum(-1))
        mem_norm = _norm_from_squares(torch.einsum("bhw,bnw->bhn", m2, memory.square()))  # [B, H, N]
    return dot / (key_norm[..., None] * mem_norm + eps)


def content_weights(
    memory: Tensor, keys: Tensor, strengths: Tensor, mask: Tensor | None = None, eps: float = CONTENT_EPS
) -> Tensor:
    """Content weighting w^c[i] = softmax_i(beta * D(k, M[i])) (NTM Eq. 5; DNC C(M, k, beta)).

    memory: [B, N, W]; keys: [B, H, W]; strengths beta: [B, H] (>= 0); mask: [B, H, W] or None -> [B, H, N].
    beta = 0 gives the uniform weighting; each row sums to 1.
    """
    return torch.softmax(strengths[..., None] * cosine_similarity(memory, keys, mask, eps), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# NTM location-based addressing (§3.3.2)
# ----------------------------------------------------------------------------------------------------------------


def interpolate(w_content: Tensor, w_prev: Tensor, gate: Tensor) -> Tensor:
    """w^g = g w^c + (1 - g) w_{t-1} (NTM Eq. 7).

    w_content, w_prev: [B, H, N]; gate g: [B, H] in [0, 1] -> [B, H, N].
    """
    g = gate[..., None]
    return g * w_content + (1 - g) * w_prev


def shift(w: Tensor, shift_weights: Tensor) -> Tensor:
    """Circular convolution w~[i] = sum_j w[j] s(i - j), indices mod N (NTM Eq. 8).

    w: [B, H, N]; shift_weights s: [B, H, S] with S = 2k + 1 odd, S <= N -> [B, H, N].
    s[..., m] is the weight of offset m - k, so offsets run -k..k and a positive offset moves weight to higher
    indices: a one-hot w at slot 0 shifted by +1 lands on slot 1.
    """
    n, s = w.shape[-1], shift_weights.shape[-1]
    if s % 2 == 0 or s > n:
        raise ValueError(f"shift: expected an odd number of shift weights S <= N = {n}, got S = {s}")
    k = s // 2
    offsets = torch.arange(-k, k + 1, device=w.device)
    # w~[i] = sum_m w[(i - offset_m) mod N] s[m]: gather every source slot at once, [N, S] indices
    source = (torch.arange(n, device=w.device)[:, None] - offsets[None, :]) % n
    return (w[..., source] * shift_weights[..., None, :]).sum(-1)


def sharpen(w: Tensor, gamma: Tensor, eps: float = SHARPEN_EPS) -> Tensor:
    """w[i]^gamma / sum_j w[j]^gamma (NTM Eq. 9), computed as softmax(gamma * log(w + eps)).

    w: [B, H, N] (a weighting, >= 0); gamma: [B, H] (>= 1) -> [B, H, N]; rows sum to 1.
    Working in log space with w + eps means zero entries (one-hot or shifted-in zeros) give neither 0/0 nor
    a NaN gradient, and tiny weights raised to a large gamma cannot underflow every entry at once.
    eps shifts the result by O(N * eps) only.
    """
    return torch.softmax(gamma[..., None] * torch.log(w + eps), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# DNC dynamic memory allocation (Methods, "Dynamic memory allocation")
# ----------------------------------------------------------------------------------------------------------------


def retention(free_gates: Tensor, read_weights_prev: Tensor) -> Tensor:
    """psi_t = prod_i (1 - f^i_t w^{r,i}_{t-1}): how much of each slot survives the free gates.

    free_gates f: [B, R] in [0, 1]; read_weights_prev: [B, R, N] -> psi: [B, N].
    """
    return torch.prod(1 - free_gates[..., None] * read_weights_prev, dim=1)


def update_usage(usage: Tensor, write_weights_prev: Tensor, psi: Tensor) -> Tensor:
    """u_t = (u_{t-1} + w^w_{t-1} - u_{t-1} * w^w_{t-1}) * psi_t.

    usage: [B, N]; write_weights_prev: [B, Hw, N]; psi: [B, N] -> [B, N].
    Several write heads act as one write weighting w^w = 1 - prod_h (1 - w^w_h): a slot is "used" unless
    every head left it alone (as DeepMind's multi-write DNC does). With Hw = 1 this is the paper's equation.
    """
    written = 1 - torch.prod(1 - write_weights_prev, dim=1)
    return (usage + written - usage * written) * psi


def allocation(usage: Tensor) -> Tensor:
    """Allocation weighting a_t[phi[j]] = (1 - u[phi[j]]) prod_{i<j} u[phi[i]], phi = SortIndicesAscending(u).

    usage: [B, N] in [0, 1] -> [B, N]; sum_i a[i] = 1 - prod_i u[i] <= 1.
    Ties: the sort is stable, so among equal usages the lowest slot index comes first in the free list (and
    gets the larger share). Gradients flow through the usage values; the permutation phi is a constant, as in
    the paper. Usage 1 gives allocation 0 with no division anywhere, so no NaN (torch's cumprod backward
    handles exact zeros).
    """
    sorted_usage, phi = torch.sort(usage, dim=-1, stable=True)
    # prod_{i<j} u[phi[i]]: exclusive cumulative product along the free list
    ones = torch.ones_like(sorted_usage[..., :1])
    prod_before = torch.cumprod(torch.cat([ones, sorted_usage[..., :-1]], dim=-1), dim=-1)
    a_sorted = (1 - sorted_usage) * prod_before
    return torch.zeros_like(usage).scatter(-1, phi, a_sorted)


def write_allocations(usage: Tensor, write_gates: Tensor) -> Tensor:
    """Allocation weightings of several write heads, each seeing the usage the heads before it leave.

    usage: [B, N]; write_gates: [B, Hw] in [0, 1] -> [B, Hw, N].
    After head h takes a_h, usage becomes u + (1 - u) * g_h * a_h, so the next head is steered to other free
    slots. ``write_gates`` is the share of each head's write that goes through allocation: DeepMind's
    multi-write DNC passes g^w * g^a. With Hw = 1 this is just ``allocation(usage)``.
    The loop over heads is inherent: head h's usage depends on head h-1's allocation.
    """
    allocations = []
    for h in range(write_gates.shape[1]):
        a = allocation(usage)
        allocations.append(a)
        usage = usage + (1 - usage) * write_gates[:, h, None] * a
    return torch.stack(allocations, dim=1)


def write_weights(content: Tensor, allocation: Tensor, alloc_gate: Tensor, write_gate: Tensor) -> Tensor:
    """w^w_t = g^w [g^a a_t + (1 - g^a) c^w_t].

    content c^w, allocation a: [B, Hw, N]; alloc_gate g^a, write_gate g^w: [B, Hw] in [0, 1] -> [B, Hw, N].
    Rows sum to <= 1 (allocation itself sums to <= 1).
    """
    ga, gw = alloc_gate[..., None], write_gate[..., None]
    return gw * (ga * allocation + (1 - ga) * content)


# ----------------------------------------------------------------------------------------------------------------
# DNC temporal memory linkage (Methods, "Temporal memory linkage"); one link matrix per write head
# ----------------------------------------------------------------------------------------------------------------


def update_precedence(p: Tensor, write_weights: Tensor) -> Tensor:
    """p_t = (1 - sum_i w^w_t[i]) p_{t-1} + w^w_t: how much each slot was the last one written to.

    p: [B, Hw, N] (p_0 = 0); write_weights: [B, Hw, N] -> [B, Hw, N]; rows sum to <= 1.
    """
    return (1 - write_weights.sum(-1, keepdim=True)) * p + write_weights


def update_link(link: Tensor, precedence_prev: Tensor, write_weights: Tensor) -> Tensor:
    """L_t[i, j] = (1 - w[i] - w[j]) L_{t-1}[i, j] + w[i] p_{t-1}[j], L_t[i, i] = 0.

    link: [B, Hw, N, N]; precedence_prev p_{t-1}: [B, Hw, N]; write_weights w: [B, Hw, N] -> [B, Hw, N, N].
    L[i, j] is the degree to which slot i was written right after slot j. Note p_{t-1}: update the link
    before the precedence.
    """
    w_i = write_weights[..., :, None]
    w_j = write_weights[..., None, :]
    new_link = (1 - w_i - w_j) * link + w_i * precedence_prev[..., None, :]
    n = link.shape[-1]
    no_self_links = 1 - torch.eye(n, dtype=link.dtype, device=link.device)
    return new_link * no_self_links


def sharpen_link_distribution(d: Tensor, s: Tensor, eps: float = LINK_EPS) -> Tensor:
    """S(d, s)[i] = d[i]^s / sum_j d[j]^s, Csordás & Schmidhuber (2019), §3.3, Eq. 2.

    d: [..., N] (>= 0); s: d's shape without the last dim (>= 0) -> [..., N], rows sum to 1.
    Their stabilised form is ((d[i] + eps) / max(d + eps))^s / sum_j ((d[j] + eps) / max(d + eps))^s; dividing
    by the max is a constant factor that cancels, so it equals softmax(s * log(d + eps)), which is how it is
    computed here (log-sum-exp does the same stabilising job). Note it renormalises: an all-zero d (an empty
    link matrix) becomes uniform, not zero.
    """
    return torch.softmax(s[..., None] * torch.log(d + eps), dim=-1)


def directional_weights(
    link: Tensor,
    read_weights_prev: Tensor,
    sharpness: Tensor | None = None,
    *,
    backward_sharpness: Tensor | None = None,
    eps: float = LINK_EPS,
) -> tuple[Tensor, Tensor]:
    """Forward f = L_t w^r_{t-1} and backward b = L_t^T w^r_{t-1} weightings, per read head and write head.

    link: [B, Hw, N, N]; read_weights_prev: [B, R, N] -> (forward [B, R, Hw, N], backward [B, R, Hw, N]).
    sharpness s: [B, R] or None. When given, f and b are sharpened with S(., s) (Csordás & Schmidhuber 2019,
    §3.3, Eq. 2, see :func:`sharpen_link_distribution`); ``s`` serves both directions unless
    ``backward_sharpness`` [B, R] is given, in which case ``sharpness`` is their s^f and it is their s^b.
    Without sharpening each weighting sums to <= 1; with it, to 1.
    """
    # f[i] = sum_j L[i, j] w[j] (slots written after the ones read); b[i] = sum_j L[j, i] w[j]
    forward = torch.einsum("bhij,brj->brhi", link, read_weights_prev)
    backward = torch.einsum("bhji,brj->brhi", link, read_weights_prev)
    if sharpness is not None:
        s_b = sharpness if backward_sharpness is None else backward_sharpness
        forward = sharpen_link_distribution(forward, sharpness[..., None].expand(forward.shape[:-1]), eps)
        backward = sharpen_link_distribution(backward, s_b[..., None].expand(backward.shape[:-1]), eps)
    return forward, backward


def read_weights(backward: Tensor, content: Tensor, forward: Tensor, read_modes: Tensor) -> Tensor:
    """w^r = sum_h pi[h] b_h + pi[Hw] c + sum_h pi[Hw + 1 + h] f_h (DNC read weighting, one b/f per write head).

    backward, forward: [B, R, Hw, N]; content c^r: [B, R, N]; read_modes pi: [B, R, 2 Hw + 1], already
    softmaxed -> [B, R, N]. Mode order: the Hw backward modes, then content, then the Hw forward modes, which
    is the paper's (b, c, f) for Hw = 1.
    """
    hw = backward.shape[2]
    if read_modes.shape[-1] != 2 * hw + 1:
        raise ValueError(f"read_weights: expected 2 * Hw + 1 = {2 * hw + 1} read modes, got {read_modes.shape[-1]}")
    pi_b, pi_c, pi_f = read_modes[..., :hw], read_modes[..., hw], read_modes[..., hw + 1 :]
    return (
        torch.einsum("brh,brhn->brn", pi_b, backward)
        + pi_c[..., None] * content
        + torch.einsum("brh,brhn->brn", pi_f, forward)
    )
