"""mann.addressing, three ways: against loop-based NumPy references written from the papers' equations,
with torch.autograd.gradcheck in float64, and on degenerate inputs (plus the properties the papers state).

The references loop over batch, heads and slots on purpose: they are meant to be read next to the equations
(NTM 2014 §3.3; DNC 2016 Methods; Csordás & Schmidhuber 2019 §3), not to be fast.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mann import addressing as A
from mann.memory import deallocate, erase_and_add

TOL = dict(rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def simplex(rng, *shape, zero_prob=0.0):
    """Random weightings over the last axis (each sums to 1); some entries exactly 0 if asked."""
    x = rng.random(shape) + 0.05
    if zero_prob:
        x = x * (rng.random(shape) >= zero_prob)
        x[..., 0] += 1e-3  # keep each row non-empty
    return x / x.sum(-1, keepdims=True)


def sub_simplex(rng, *shape):
    """Random weightings summing to a random total in (0, 1)."""
    return simplex(rng, *shape) * rng.random(shape[:-1])[..., None]


def t(x, grad=False):
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=grad)


def close(actual, expected):
    np.testing.assert_allclose(actual.detach().numpy(), expected, **TOL)


def grads_are_finite(out, *inputs):
    """Backward of a random projection of ``out``; every input gets a finite gradient."""
    torch.manual_seed(0)
    (out * torch.randn_like(out)).sum().backward()
    for x in inputs:
        assert x.grad is not None and torch.isfinite(x.grad).all(), x.grad


SHAPES = [(1, 1, 3, 2), (2, 3, 5, 4), (3, 2, 8, 6)]  # (B, H, N, W)


# ----------------------------------------------------------------------------------------------------------------
# NumPy references, from the equations
# ----------------------------------------------------------------------------------------------------------------


def ref_cosine(memory, keys, mask=None, eps=1e-6):
    # D(u, v) = u.v / (|u||v| + eps), with u = k*m, v = M[i]*m (Csordás & Schmidhuber §3.1-3.2)
    B, N, W = memory.shape
    H = keys.shape[1]
    out = np.zeros((B, H, N))
    for b in range(B):
        for h in range(H):
            for i in range(N):
                dot = nk = nm = 0.0
                for w in range(W):
                    m = 1.0 if mask is None else mask[b, h, w]
                    u, v = keys[b, h, w] * m, memory[b, i, w] * m
                    dot += u * v
                    nk += u * u
                    nm += v * v
                out[b, h, i] = dot / (math.sqrt(nk) * math.sqrt(nm) + eps)
    return out


def ref_content(memory, keys, strengths, mask=None, eps=1e-6):
    # w^c[i] = exp(beta D(k, M[i])) / sum_j exp(beta D(k, M[j]))
    d = ref_cosine(memory, keys, mask, eps)
    B, H, N = d.shape
    out = np.zeros_like(d)
    for b in range(B):
        for h in range(H):
            z = sum(math.exp(strengths[b, h] * d[b, h, j]) for j in range(N))
            for i in range(N):
                out[b, h, i] = math.exp(strengths[b, h] * d[b, h, i]) / z
    return out


def ref_interpolate(wc, wp, g):
    B, H, N = wc.shape
    out = np.zeros_like(wc)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                out[b, h, i] = g[b, h] * wc[b, h, i] + (1 - g[b, h]) * wp[b, h, i]
    return out


def ref_shift(w, s):
    # w~(i) = sum_j w(j) s(i - j), indices mod N; s[m] is the weight of offset m - k
    B, H, N = w.shape
    S = s.shape[-1]
    k = S // 2
    out = np.zeros_like(w)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                for j in range(N):
                    for m in range(S):
                        if (m - k) % N == (i - j) % N:
                            out[b, h, i] += w[b, h, j] * s[b, h, m]
    return out


def ref_sharpen(w, gamma, eps=1e-12):
    # w(i)^gamma / sum_j w(j)^gamma, with the implementation's eps added to w
    B, H, N = w.shape
    out = np.zeros_like(w)
    for b in range(B):
        for h in range(H):
            z = sum((w[b, h, j] + eps) ** gamma[b, h] for j in range(N))
            for i in range(N):
                out[b, h, i] = (w[b, h, i] + eps) ** gamma[b, h] / z
    return out


def ref_retention(f, wr):
    # psi[i] = prod_r (1 - f^r w^r[i])
    B, R, N = wr.shape
    out = np.ones((B, N))
    for b in range(B):
        for i in range(N):
            for r in range(R):
                out[b, i] *= 1 - f[b, r] * wr[b, r, i]
    return out


def ref_usage(u, ww, psi):
    # u_t = (u + w - u w) psi, with w = 1 - prod_h (1 - w_h) for several write heads
    B, Hw, N = ww.shape
    out = np.zeros_like(u)
    for b in range(B):
        for i in range(N):
            untouched = 1.0
            for h in range(Hw):
                untouched *= 1 - ww[b, h, i]
            w = 1 - untouched
            out[b, i] = (u[b, i] + w - u[b, i] * w) * psi[b, i]
    return out


def ref_allocation(u):
    # phi = SortIndicesAscending(u) (Python's sort is stable: ties keep index order);
    # a[phi[j]] = (1 - u[phi[j]]) prod_{i<j} u[phi[i]]
    B, N = u.shape
    out = np.zeros_like(u)
    for b in range(B):
        phi = sorted(range(N), key=lambda i: u[b, i])
        for j in range(N):
            prod = 1.0
            for i in range(j):
                prod *= u[b, phi[i]]
            out[b, phi[j]] = (1 - u[b, phi[j]]) * prod
    return out


def ref_write_allocations(u, g):
    B, Hw = g.shape
    u = u.copy()
    out = np.zeros((B, Hw, u.shape[1]))
    for h in range(Hw):
        a = ref_allocation(u)
        out[:, h] = a
        for b in range(B):
            for i in range(u.shape[1]):
                u[b, i] = u[b, i] + (1 - u[b, i]) * g[b, h] * a[b, i]
    return out


def ref_write_weights(c, a, ga, gw):
    B, Hw, N = c.shape
    out = np.zeros_like(c)
    for b in range(B):
        for h in range(Hw):
            for i in range(N):
                out[b, h, i] = gw[b, h] * (ga[b, h] * a[b, h, i] + (1 - ga[b, h]) * c[b, h, i])
    return out


def ref_precedence(p, w):
    B, Hw, N = w.shape
    out = np.zeros_like(p)
    for b in range(B):
        for h in range(Hw):
            total = sum(w[b, h, j] for j in range(N))
            for i in range(N):
                out[b, h, i] = (1 - total) * p[b, h, i] + w[b, h, i]
    return out


def ref_link(L, p, w):
    # L[i,j] = (1 - w[i] - w[j]) L[i,j] + w[i] p[j]; L[i,i] = 0
    B, Hw, N = w.shape
    out = np.zeros_like(L)
    for b in range(B):
        for h in range(Hw):
            for i in range(N):
                for j in range(N):
                    if i != j:
                        out[b, h, i, j] = (1 - w[b, h, i] - w[b, h, j]) * L[b, h, i, j] + w[b, h, i] * p[b, h, j]
    return out


def ref_sharp_link(d, s, eps=1e-6):
    # Csordás & Schmidhuber (2019) Eq. 2, stabilised form: ((d_i+eps)/max(d+eps))^s / sum_j (...)^s
    N = len(d)
    top = max(d[j] + eps for j in range(N))
    x = [((d[j] + eps) / top) ** s for j in range(N)]
    return [x[i] / sum(x) for i in range(N)]


def ref_directional(L, wr, s=None, s_back=None, eps=1e-6):
    # f[i] = sum_j L[i,j] w[j]; b[i] = sum_j L[j,i] w[j]
    B, Hw, N, _ = L.shape
    R = wr.shape[1]
    fwd = np.zeros((B, R, Hw, N))
    bwd = np.zeros((B, R, Hw, N))
    for b in range(B):
        for r in range(R):
            for h in range(Hw):
                for i in range(N):
                    for j in range(N):
                        fwd[b, r, h, i] += L[b, h, i, j] * wr[b, r, j]
                        bwd[b, r, h, i] += L[b, h, j, i] * wr[b, r, j]
                if s is not None:
                    sb = s if s_back is None else s_back
                    fwd[b, r, h] = ref_sharp_link(fwd[b, r, h], s[b, r], eps)
                    bwd[b, r, h] = ref_sharp_link(bwd[b, r, h], sb[b, r], eps)
    return fwd, bwd


def ref_read_weights(bwd, c, fwd, pi):
    # modes: pi[0..Hw-1] backward, pi[Hw] content, pi[Hw+1..2Hw] forward
    B, R, Hw, N = bwd.shape
    out = np.zeros((B, R, N))
    for b in range(B):
        for r in range(R):
            for i in range(N):
                out[b, r, i] = pi[b, r, Hw] * c[b, r, i]
                for h in range(Hw):
                    out[b, r, i] += pi[b, r, h] * bwd[b, r, h, i] + pi[b, r, Hw + 1 + h] * fwd[b, r, h, i]
    return out


def random_link_state(rng, B, Hw, N, steps=4):
    """(link, precedence) reached by a few random writes from L_0 = 0, p_0 = 0, by the references."""
    L = np.zeros((B, Hw, N, N))
    p = np.zeros((B, Hw, N))
    for _ in range(steps):
        w = sub_simplex(rng, B, Hw, N)
        L = ref_link(L, p, w)
        p = ref_precedence(p, w)
    return L, p


# ----------------------------------------------------------------------------------------------------------------
# content addressing
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,H,N,W", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_content_weights_match_reference(B, H, N, W, masked):
    rng = np.random.default_rng(B * 100 + N)
    memory, keys = rng.normal(size=(B, N, W)), rng.normal(size=(B, H, W))
    beta = rng.random((B, H)) * 10
    mask = rng.random((B, H, W)) if masked else None
    got = A.content_weights(t(memory), t(keys), t(beta), None if mask is None else t(mask))
    close(got, ref_content(memory, keys, beta, mask))
    close(got.sum(-1), np.ones((B, H)))
    close(A.cosine_similarity(t(memory), t(keys), None if mask is None else t(mask)), ref_cosine(memory, keys, mask))


def test_content_weights_gradcheck():
    rng = np.random.default_rng(1)
    inputs = (t(rng.normal(size=(2, 4, 3)), True), t(rng.normal(size=(2, 2, 3)), True), t(rng.random((2, 2)) * 5, True))
    assert torch.autograd.gradcheck(A.content_weights, inputs)
    mask = t(rng.random((2, 2, 3)), True)
    assert torch.autograd.gradcheck(A.content_weights, (*inputs, mask))


@pytest.mark.parametrize("masked", [False, True])
def test_content_weights_all_zero_memory_and_keys_are_uniform_with_finite_gradients(masked):
    memory = torch.zeros(2, 5, 3, dtype=torch.float64, requires_grad=True)
    keys = torch.zeros(2, 2, 3, dtype=torch.float64, requires_grad=True)
    beta = t(np.full((2, 2), 7.0), True)
    mask = t(np.random.default_rng(0).random((2, 2, 3)), True) if masked else None
    w = A.content_weights(memory, keys, beta, mask)
    close(w, np.full((2, 2, 5), 0.2))
    grads_are_finite(w, memory, keys, beta, *([mask] if masked else []))


def test_content_weights_zero_memory_with_a_real_key_and_a_zero_key_on_real_memory():
    rng = np.random.default_rng(2)
    keys = t(rng.normal(size=(1, 1, 4)), True)
    memory = torch.zeros(1, 3, 4, dtype=torch.float64, requires_grad=True)
    w = A.content_weights(memory, keys, t([[3.0]]))
    close(w, np.full((1, 1, 3), 1 / 3))
    grads_are_finite(w, memory, keys)
    memory2 = t(rng.normal(size=(1, 3, 4)), True)
    zero_key = torch.zeros(1, 1, 4, dtype=torch.float64, requires_grad=True)
    w2 = A.content_weights(memory2, zero_key, t([[3.0]]))
    close(w2, np.full((1, 1, 3), 1 / 3))
    grads_are_finite(w2, memory2, zero_key)


def test_zero_strength_gives_uniform_weights():
    rng = np.random.default_rng(3)
    w = A.content_weights(t(rng.normal(size=(2, 6, 3))), t(rng.normal(size=(2, 3, 3))), t(np.zeros((2, 3))))
    close(w, np.full((2, 3, 6), 1 / 6))


def test_content_weights_pick_the_matching_slot_and_a_zeroed_slot_scores_zero():
    memory = t([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    w = A.content_weights(memory, t([[[0.0, 2.0, 0.0]]]), t([[50.0]]))
    assert w[0, 0].argmax() == 1 and w[0, 0, 1] > 0.99
    # the paper's eps outside the norms: an erased (all-zero) slot has similarity exactly 0 (§3.2)
    d = A.cosine_similarity(memory, t([[[1.0, 1.0, 1.0]]]))
    assert d[0, 0, 2] == 0.0


def test_mask_ignores_the_masked_part_of_memory_and_key():
    rng = np.random.default_rng(4)
    memory, keys = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 3, 4))
    mask = np.ones((2, 3, 4))
    mask[..., 2:] = 0.0  # search on the first two components only
    beta = np.full((2, 3), 4.0)
    w = A.content_weights(t(memory), t(keys), t(beta), t(mask))
    memory2, keys2 = memory.copy(), keys.copy()
    memory2[..., 2:] = rng.normal(size=(2, 5, 2)) * 10  # the "value" part changes
    keys2[..., 2:] = rng.normal(size=(2, 3, 2))
    close(A.content_weights(t(memory2), t(keys2), t(beta), t(mask)), w.numpy())
    # a mask of ones is no mask
    close(A.content_weights(t(memory), t(keys), t(beta), t(np.ones((2, 3, 4)))), ref_content(memory, keys, beta))


# ----------------------------------------------------------------------------------------------------------------
# NTM location addressing: interpolate, shift, sharpen
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,H,N,W", SHAPES)
def test_interpolate_matches_reference_and_stays_a_weighting(B, H, N, W):
    rng = np.random.default_rng(N)
    wc, wp, g = simplex(rng, B, H, N), simplex(rng, B, H, N), rng.random((B, H))
    got = A.interpolate(t(wc), t(wp), t(g))
    close(got, ref_interpolate(wc, wp, g))
    close(got.sum(-1), np.ones((B, H)))


def test_interpolate_gradcheck():
    rng = np.random.default_rng(5)
    args = (t(simplex(rng, 2, 2, 4), True), t(simplex(rng, 2, 2, 4), True), t(rng.random((2, 2)), True))
    assert torch.autograd.gradcheck(A.interpolate, args)


@pytest.mark.parametrize("N,S", [(3, 1), (3, 3), (5, 3), (7, 5), (7, 7), (8, 7), (9, 9)])
def test_shift_matches_reference_and_stays_a_weighting(N, S):
    rng = np.random.default_rng(N * 10 + S)
    w, s = simplex(rng, 2, 3, N), simplex(rng, 2, 3, S)
    got = A.shift(t(w), t(s))
    close(got, ref_shift(w, s))
    close(got.sum(-1), np.ones((2, 3)))


def test_shift_gradcheck():
    rng = np.random.default_rng(6)
    for n, s in [(5, 3), (5, 5), (4, 1)]:
        args = (t(simplex(rng, 2, 2, n), True), t(simplex(rng, 2, 2, s), True))
        assert torch.autograd.gradcheck(A.shift, args)


def test_shift_by_one_hot_kernels_rotates_and_wraps_around():
    rng = np.random.default_rng(7)
    N = 5
    w = t(simplex(rng, 1, 1, N))
    close(A.shift(w, t([[[1.0]]])), w.numpy())  # S = 1: identity
    for S in (3, 5):  # S = N included
        k = S // 2
        for m in range(S):
            s = np.zeros((1, 1, S))
            s[..., m] = 1.0
            close(A.shift(w, t(s)), torch.roll(w, shifts=m - k, dims=-1).numpy())
    one_hot = t([[[0.0, 0.0, 0.0, 0.0, 1.0]]])
    close(A.shift(one_hot, t([[[0.0, 0.0, 1.0]]])), [[[1.0, 0.0, 0.0, 0.0, 0.0]]])  # +1 from the last slot wraps


@pytest.mark.parametrize("N,S", [(5, 2), (5, 7), (4, 5)])
def test_shift_rejects_even_or_too_large_kernels(N, S):
    with pytest.raises(ValueError, match="odd number of shift weights"):
        A.shift(torch.ones(1, 1, N), torch.ones(1, 1, S))


@pytest.mark.parametrize("B,H,N,W", SHAPES)
def test_sharpen_matches_reference(B, H, N, W):
    rng = np.random.default_rng(N + 1)
    w, gamma = simplex(rng, B, H, N, zero_prob=0.3), 1 + rng.random((B, H)) * 5
    got = A.sharpen(t(w), t(gamma))
    close(got, ref_sharpen(w, gamma))
    close(got.sum(-1), np.ones((B, H)))


def test_sharpen_equals_the_exact_formula_away_from_zero_and_sharpens():
    rng = np.random.default_rng(8)
    w, gamma = simplex(rng, 2, 3, 6), 1 + rng.random((2, 3)) * 4
    exact = w ** gamma[..., None] / (w ** gamma[..., None]).sum(-1, keepdims=True)
    np.testing.assert_allclose(A.sharpen(t(w), t(gamma)).numpy(), exact, rtol=1e-9)
    close(A.sharpen(t(w), t(np.ones((2, 3)))), w)  # gamma = 1: no change
    assert (A.sharpen(t(w), t(gamma)).max(-1).values >= t(w).max(-1).values - 1e-12).all()


def test_sharpen_gradcheck():
    rng = np.random.default_rng(9)
    args = (t(simplex(rng, 2, 2, 5), True), t(1 + rng.random((2, 2)) * 3, True))
    assert torch.autograd.gradcheck(A.sharpen, args)


def test_sharpen_with_zeros_and_one_hot_is_finite_with_finite_gradients():
    w = t([[[0.0, 0.7, 0.0, 0.3], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], True)
    gamma = t([[1.0, 20.0, 3.0]], True)
    out = A.sharpen(w, gamma)
    assert torch.isfinite(out).all()
    close(out.sum(-1), np.ones((1, 3)))
    close(out[0, 0], [0.0, 0.7, 0.0, 0.3])  # gamma = 1 keeps it (up to eps)
    close(out[0, 1], [0.0, 0.0, 1.0, 0.0])
    close(out[0, 2], [0.25] * 4)  # an all-zero row becomes uniform, not NaN
    grads_are_finite(out, w, gamma)
    tiny = t(np.full((1, 1, 4), 1e-300), True)  # each w^gamma underflows on its own
    out = A.sharpen(tiny, t([[50.0]], True))
    close(out, np.full((1, 1, 4), 0.25))
    grads_are_finite(out, tiny)


def test_ntm_addressing_pipeline_keeps_a_weighting_in_float32():
    torch.manual_seed(0)
    B, H, N, W = 4, 2, 16, 8
    memory = torch.randn(B, N, W)
    w_prev = torch.softmax(torch.randn(B, H, N), -1)
    for _ in range(20):
        wc = A.content_weights(memory, torch.randn(B, H, W), torch.rand(B, H) * 20)
        wg = A.interpolate(wc, w_prev, torch.rand(B, H))
        ws = A.shift(wg, torch.softmax(torch.randn(B, H, 3) * 5, -1))
        w_prev = A.sharpen(ws, 1 + torch.rand(B, H) * 30)
        assert w_prev.dtype == torch.float32 and torch.isfinite(w_prev).all()
        torch.testing.assert_close(w_prev.sum(-1), torch.ones(B, H))


# ----------------------------------------------------------------------------------------------------------------
# DNC dynamic memory allocation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,R,N", [(1, 1, 3), (2, 3, 5), (3, 2, 8)])
def test_retention_matches_reference(B, R, N):
    rng = np.random.default_rng(R * N)
    f, wr = rng.random((B, R)), simplex(rng, B, R, N)
    got = A.retention(t(f), t(wr))
    close(got, ref_retention(f, wr))
    assert ((got >= 0) & (got <= 1)).all()


@pytest.mark.parametrize("B,Hw,N", [(1, 1, 3), (2, 2, 5), (3, 3, 8)])
def test_update_usage_matches_reference_and_stays_in_unit_interval(B, Hw, N):
    rng = np.random.default_rng(Hw * N)
    u, ww, psi = rng.random((B, N)), sub_simplex(rng, B, Hw, N), rng.random((B, N))
    got = A.update_usage(t(u), t(ww), t(psi))
    close(got, ref_usage(u, ww, psi))
    assert ((got >= 0) & (got <= 1)).all()


def test_single_write_head_usage_is_the_paper_equation():
    rng = np.random.default_rng(10)
    u, w, psi = rng.random((2, 4)), sub_simplex(rng, 2, 1, 4), rng.random((2, 4))
    close(A.update_usage(t(u), t(w), t(psi)), (u + w[:, 0] - u * w[:, 0]) * psi)


def test_retention_and_usage_gradcheck():
    rng = np.random.default_rng(11)
    assert torch.autograd.gradcheck(A.retention, (t(rng.random((2, 3)), True), t(simplex(rng, 2, 3, 4), True)))
    args = (t(rng.random((2, 4)), True), t(sub_simplex(rng, 2, 2, 4), True), t(rng.random((2, 4)), True))
    assert torch.autograd.gradcheck(A.update_usage, args)


@pytest.mark.parametrize("B,N", [(1, 1), (1, 4), (3, 7), (2, 16)])
def test_allocation_matches_reference(B, N):
    rng = np.random.default_rng(N)
    u = rng.random((B, N))
    got = A.allocation(t(u))
    close(got, ref_allocation(u))
    close(got.sum(-1), 1 - u.prod(-1))  # sum_i a[i] = 1 - prod_i u[i] <= 1
    assert (got >= 0).all()


def test_allocation_picks_the_least_used_slot():
    u = t([[0.9, 0.05, 0.5, 0.99]])
    a = A.allocation(u)
    assert a.argmax() == 1
    close(a, ref_allocation(u.numpy()))


def test_allocation_ties_follow_the_stable_order_and_sum_at_most_one():
    rng = np.random.default_rng(12)
    u = np.array([[0.5, 0.2, 0.5, 0.2, 0.9], [0.3, 0.3, 0.3, 0.3, 0.3], [0.0, 1.0, 0.0, 1.0, 0.0]])
    u = np.concatenate([u, rng.choice([0.0, 0.25, 0.5, 1.0], size=(4, 5))])
    a = A.allocation(t(u))
    close(a, ref_allocation(u))
    assert (a.sum(-1) <= 1 + 1e-12).all()
    # equal usage: the lower index comes first in the free list and gets the larger share
    assert a[0, 1] > a[0, 3] > 0 and a[0, 0] > a[0, 2] > 0


def test_allocation_at_usage_exactly_zero_and_one_is_finite_with_finite_gradients():
    u = t([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.5], [1 - 1e-12, 1.0, 1 - 1e-9, 1.0]], True)
    a = A.allocation(u)
    close(a[0], [1.0, 0.0, 0.0, 0.0])  # all free: the first free slot takes everything
    close(a[1], [0.0] * 4)  # all used: nothing to allocate, and no NaN
    close(a[2], [0.0, 1.0, 0.0, 0.0])
    assert a[3].sum() < 1e-8
    grads_are_finite(a, u)


def test_allocation_gradient_flows_through_usage_values():
    rng = np.random.default_rng(13)
    u = t(rng.random((2, 5)), True)
    assert torch.autograd.gradcheck(A.allocation, (u,))
    u0 = t([[0.0, 0.3, 0.6, 1.0]], True)  # exact 0 and 1, no ties: still differentiable
    assert torch.autograd.gradcheck(A.allocation, (u0,))
    A.allocation(u0)[0, 1].backward()  # a[1] = (1 - u[1]) u[0]
    close(u0.grad, [[0.7, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("Hw", [1, 2, 3])
def test_write_allocations_match_reference(Hw):
    rng = np.random.default_rng(Hw)
    u, g = rng.random((3, 6)), rng.random((3, Hw))
    got = A.write_allocations(t(u), t(g))
    close(got, ref_write_allocations(u, g))
    close(got[:, 0], ref_allocation(u))
    assert (got.sum(-1) <= 1 + 1e-12).all()


def test_write_allocations_steer_heads_to_different_free_slots():
    u = t([[0.0, 0.0, 1.0, 0.0]])
    a = A.write_allocations(u, t([[1.0, 1.0, 1.0]]))
    close(a, [[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    a_closed = A.write_allocations(u, t([[0.0, 1.0]]))  # a closed gate leaves the usage to the next head
    close(a_closed[:, 1], a_closed[:, 0].detach().numpy())


def test_write_allocations_gradcheck():
    rng = np.random.default_rng(14)
    assert torch.autograd.gradcheck(A.write_allocations, (t(rng.random((2, 4)), True), t(rng.random((2, 2)), True)))


@pytest.mark.parametrize("B,Hw,N", [(1, 1, 3), (2, 2, 5)])
def test_write_weights_match_reference_and_sum_at_most_one(B, Hw, N):
    rng = np.random.default_rng(15 + Hw)
    c, a = simplex(rng, B, Hw, N), sub_simplex(rng, B, Hw, N)
    ga, gw = rng.random((B, Hw)), rng.random((B, Hw))
    got = A.write_weights(t(c), t(a), t(ga), t(gw))
    close(got, ref_write_weights(c, a, ga, gw))
    assert (got.sum(-1) <= 1 + 1e-12).all() and (got >= 0).all()
    args = tuple(t(x, True) for x in (c, a, ga, gw))
    assert torch.autograd.gradcheck(A.write_weights, args)


# ----------------------------------------------------------------------------------------------------------------
# DNC temporal linkage
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,Hw,N", [(1, 1, 3), (2, 2, 5), (2, 1, 8)])
def test_precedence_and_link_match_reference(B, Hw, N):
    rng = np.random.default_rng(N + Hw)
    L, p = random_link_state(rng, B, Hw, N)
    w = sub_simplex(rng, B, Hw, N)
    close(A.update_precedence(t(p), t(w)), ref_precedence(p, w))
    close(A.update_link(t(L), t(p), t(w)), ref_link(L, p, w))


def test_precedence_and_link_gradcheck():
    rng = np.random.default_rng(16)
    L, p = random_link_state(rng, 2, 2, 4)
    w = sub_simplex(rng, 2, 2, 4)
    assert torch.autograd.gradcheck(A.update_precedence, (t(p, True), t(w, True)))
    assert torch.autograd.gradcheck(A.update_link, (t(L, True), t(p, True), t(w, True)))


def test_link_properties_hold_over_a_sequence_of_writes():
    """Zero diagonal, entries in [0, 1], rows and columns sum to <= 1, precedence sums to <= 1."""
    rng = np.random.default_rng(17)
    B, Hw, N = 3, 2, 6
    L, p = torch.zeros(B, Hw, N, N, dtype=torch.float64), torch.zeros(B, Hw, N, dtype=torch.float64)
    for step in range(12):
        w = sub_simplex(rng, B, Hw, N) if step % 3 else simplex(rng, B, Hw, N)
        L = A.update_link(L, p, t(w))
        p = A.update_precedence(p, t(w))
        assert (L.diagonal(dim1=-2, dim2=-1) == 0).all()
        assert ((L >= -1e-12) & (L <= 1 + 1e-12)).all()
        assert (L.sum(-1) <= 1 + 1e-12).all() and (L.sum(-2) <= 1 + 1e-12).all()
        assert (p >= 0).all() and (p.sum(-1) <= 1 + 1e-12).all()


def test_one_hot_writes_are_recorded_as_exact_links_and_followed_both_ways():
    order = [2, 0, 3]  # slots written at t = 1, 2, 3
    N = 4
    L, p = torch.zeros(1, 1, N, N, dtype=torch.float64), torch.zeros(1, 1, N, dtype=torch.float64)
    for slot in order:
        w = torch.zeros(1, 1, N, dtype=torch.float64)
        w[..., slot] = 1.0
        L = A.update_link(L, p, w)
        p = A.update_precedence(p, w)
    expected = np.zeros((N, N))
    expected[0, 2] = expected[3, 0] = 1.0  # L[i, j] = 1: i written right after j
    close(L[0, 0], expected)
    close(p[0, 0], [0.0, 0.0, 0.0, 1.0])
    read_prev = t([[[1.0, 0.0, 0.0, 0.0]]])  # read slot 0 last step
    fwd, bwd = A.directional_weights(L, read_prev)
    close(fwd[0, 0, 0], [0.0, 0.0, 0.0, 1.0])  # next written: 3
    close(bwd[0, 0, 0], [0.0, 0.0, 1.0, 0.0])  # previously written: 2


@pytest.mark.parametrize("B,R,Hw,N", [(1, 1, 1, 3), (2, 3, 2, 5), (2, 2, 1, 7)])
def test_directional_weights_match_reference(B, R, Hw, N):
    rng = np.random.default_rng(B + R + Hw + N)
    L, _ = random_link_state(rng, B, Hw, N)
    wr = simplex(rng, B, R, N)
    fwd, bwd = A.directional_weights(t(L), t(wr))
    ref_f, ref_b = ref_directional(L, wr)
    close(fwd, ref_f)
    close(bwd, ref_b)
    assert (fwd.sum(-1) <= 1 + 1e-12).all() and (bwd.sum(-1) <= 1 + 1e-12).all()


@pytest.mark.parametrize("B,R,Hw,N", [(1, 1, 1, 3), (2, 3, 2, 5)])
def test_sharpened_directional_weights_match_the_papers_stabilised_equation(B, R, Hw, N):
    rng = np.random.default_rng(20 + N)
    L, _ = random_link_state(rng, B, Hw, N)
    wr = simplex(rng, B, R, N)
    s, s_back = 1 + rng.random((B, R)) * 4, 1 + rng.random((B, R)) * 4
    fwd, bwd = A.directional_weights(t(L), t(wr), t(s))
    ref_f, ref_b = ref_directional(L, wr, s)
    close(fwd, ref_f)
    close(bwd, ref_b)
    close(fwd.sum(-1), np.ones((B, R, Hw)))
    fwd2, bwd2 = A.directional_weights(t(L), t(wr), t(s), backward_sharpness=t(s_back))
    ref_f2, ref_b2 = ref_directional(L, wr, s, s_back)
    close(fwd2, ref_f2)
    close(bwd2, ref_b2)


def test_link_sharpness_one_renormalises_and_larger_sharpness_concentrates():
    rng = np.random.default_rng(21)
    L, _ = random_link_state(rng, 2, 1, 6, steps=8)
    wr = t(simplex(rng, 2, 2, 6))
    plain, _ = A.directional_weights(t(L), wr)
    ones, _ = A.directional_weights(t(L), wr, t(np.ones((2, 2))))
    expected = (plain + 1e-6) / (plain + 1e-6).sum(-1, keepdim=True)
    close(ones, expected.numpy())
    sharp, _ = A.directional_weights(t(L), wr, t(np.full((2, 2), 8.0)))
    assert (sharp.max(-1).values > ones.max(-1).values).all()


def test_directional_weights_gradcheck_and_empty_link_degenerate_case():
    rng = np.random.default_rng(22)
    L, _ = random_link_state(rng, 2, 2, 4)
    wr, s = t(simplex(rng, 2, 3, 4), True), t(1 + rng.random((2, 3)) * 3, True)
    assert torch.autograd.gradcheck(lambda link, w: A.directional_weights(link, w), (t(L, True), wr))
    assert torch.autograd.gradcheck(lambda link, w, s_: A.directional_weights(link, w, s_), (t(L, True), wr, s))
    # L_0 = 0: plain weightings are zero; sharpened ones are uniform (Eq. 2 renormalises), gradients finite
    empty = torch.zeros(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    fwd, bwd = A.directional_weights(empty, wr)
    close(fwd, np.zeros((2, 3, 2, 4)))
    fwd, bwd = A.directional_weights(empty, wr, s)
    close(fwd, np.full((2, 3, 2, 4), 0.25))
    grads_are_finite(fwd + bwd, empty, wr, s)


@pytest.mark.parametrize("B,R,Hw,N", [(1, 1, 1, 3), (2, 3, 2, 5)])
def test_read_weights_match_reference(B, R, Hw, N):
    rng = np.random.default_rng(30 + Hw)
    bwd, fwd = sub_simplex(rng, B, R, Hw, N), sub_simplex(rng, B, R, Hw, N)
    c, pi = simplex(rng, B, R, N), simplex(rng, B, R, 2 * Hw + 1)
    got = A.read_weights(t(bwd), t(c), t(fwd), t(pi))
    close(got, ref_read_weights(bwd, c, fwd, pi))
    assert (got.sum(-1) <= 1 + 1e-12).all()
    args = tuple(t(x, True) for x in (bwd, c, fwd, pi))
    assert torch.autograd.gradcheck(A.read_weights, args)


def test_read_modes_select_backward_content_forward_in_that_order():
    Hw, N = 2, 4
    eye = np.eye(N)
    bwd = np.stack([eye[0], eye[1]])[None, None]  # [1, 1, Hw, N]
    fwd = np.stack([eye[2], eye[3]])[None, None]
    c = np.full((1, 1, N), 0.25)
    for mode, expected in enumerate([eye[0], eye[1], c[0, 0], eye[2], eye[3]]):
        pi = np.zeros((1, 1, 2 * Hw + 1))
        pi[..., mode] = 1.0  # one-hot read mode
        close(A.read_weights(t(bwd), t(c), t(fwd), t(pi))[0, 0], expected)
    with pytest.raises(ValueError, match="read modes"):
        A.read_weights(t(bwd), t(c), t(fwd), t(np.ones((1, 1, 3)) / 3))


def test_dnc_addressing_pipeline_stays_finite_and_normalised_in_float32_with_saturated_gates():
    """Several steps of a DNC's addressing with gates at 0/1 and one-hot weightings: no NaN, valid weightings."""
    torch.manual_seed(1)
    B, R, Hw, N, W = 3, 2, 2, 8, 5
    memory = torch.zeros(B, N, W)
    usage = torch.zeros(B, N)
    link, prec = torch.zeros(B, Hw, N, N), torch.zeros(B, Hw, N)
    ww, wr = torch.zeros(B, Hw, N), torch.zeros(B, R, N)
    for step in range(15):
        saturated = step % 2 == 0
        gate = (lambda *s: torch.randint(0, 2, s).float()) if saturated else (lambda *s: torch.rand(*s))
        psi = A.retention(gate(B, R), wr)
        usage = A.update_usage(usage, ww, psi)
        cw = A.content_weights(memory, torch.randn(B, Hw, W), torch.rand(B, Hw) * 10, torch.rand(B, Hw, W))
        alloc_gate, write_gate = gate(B, Hw), gate(B, Hw)
        alloc = A.write_allocations(usage, alloc_gate * write_gate)
        ww = A.write_weights(cw, alloc, alloc_gate, write_gate)
        memory = erase_and_add(deallocate(memory, psi), ww, torch.rand(B, Hw, W), torch.randn(B, Hw, W))
        link = A.update_link(link, prec, ww)
        prec = A.update_precedence(prec, ww)
        fwd, bwd = A.directional_weights(link, wr, 1 + torch.rand(B, R) * 5)
        cr = A.content_weights(memory, torch.randn(B, R, W), torch.rand(B, R) * 10)
        wr = A.read_weights(bwd, cr, fwd, torch.softmax(torch.randn(B, R, 2 * Hw + 1) * 10, -1))
        for x in (psi, usage, alloc, ww, link, prec, fwd, bwd, wr, memory):
            assert x.dtype == torch.float32 and torch.isfinite(x).all()
        assert ((usage >= 0) & (usage <= 1 + 1e-6)).all()
        assert (ww.sum(-1) <= 1 + 1e-5).all() and (alloc.sum(-1) <= 1 + 1e-5).all()
        torch.testing.assert_close(wr.sum(-1), torch.ones(B, R))
        assert (link.diagonal(dim1=-2, dim2=-1) == 0).all()
