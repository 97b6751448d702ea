"""mann.memory against loop-based NumPy references (NTM 2014 §3.1-3.2; DNC 2016 Methods; Csordás &
Schmidhuber 2019 Eq. 1), with gradcheck in float64 and on degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mann import addressing as A
from mann.memory import deallocate, erase_and_add, read

TOL = dict(rtol=1e-10, atol=1e-12)


def t(x, grad=False):
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=grad)


def close(actual, expected):
    np.testing.assert_allclose(actual.detach().numpy(), expected, **TOL)


def simplex(rng, *shape):
    x = rng.random(shape) + 0.05
    return x / x.sum(-1, keepdims=True)


def ref_read(M, w):
    # r[k] = sum_i w[i] M[i, k]
    B, N, W = M.shape
    R = w.shape[1]
    out = np.zeros((B, R, W))
    for b in range(B):
        for r in range(R):
            for k in range(W):
                for i in range(N):
                    out[b, r, k] += w[b, r, i] * M[b, i, k]
    return out


def ref_erase_and_add(M, w, e, a):
    # M~[i, k] = M[i, k] prod_h (1 - w_h[i] e_h[k]);  M[i, k] = M~[i, k] + sum_h w_h[i] a_h[k]
    B, N, W = M.shape
    Hw = w.shape[1]
    out = np.zeros_like(M)
    for b in range(B):
        for i in range(N):
            for k in range(W):
                keep = 1.0
                added = 0.0
                for h in range(Hw):
                    keep *= 1 - w[b, h, i] * e[b, h, k]
                    added += w[b, h, i] * a[b, h, k]
                out[b, i, k] = M[b, i, k] * keep + added
    return out


def ref_deallocated_write(M, psi, w, e, v):
    # Csordás & Schmidhuber (2019) Eq. 1, one write head: M_t = M_{t-1} o psi 1^T o (E - w e^T) + w v^T
    B, N, W = M.shape
    out = np.zeros_like(M)
    for b in range(B):
        for i in range(N):
            for k in range(W):
                out[b, i, k] = M[b, i, k] * psi[b, i] * (1 - w[b, 0, i] * e[b, 0, k]) + w[b, 0, i] * v[b, 0, k]
    return out


@pytest.mark.parametrize("B,R,N,W", [(1, 1, 3, 2), (2, 3, 5, 4), (3, 2, 8, 6)])
def test_read_matches_reference(B, R, N, W):
    rng = np.random.default_rng(N)
    M, w = rng.normal(size=(B, N, W)), simplex(rng, B, R, N)
    close(read(t(M), t(w)), ref_read(M, w))


def test_read_with_one_hot_weights_returns_the_slot_and_gradcheck():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(2, 4, 3))
    w = np.zeros((2, 1, 4))
    w[0, 0, 2] = w[1, 0, 0] = 1.0
    close(read(t(M), t(w))[:, 0], np.stack([M[0, 2], M[1, 0]]))
    assert torch.autograd.gradcheck(read, (t(M, True), t(simplex(rng, 2, 3, 4), True)))


@pytest.mark.parametrize("B,Hw,N,W", [(1, 1, 3, 2), (2, 2, 5, 4), (2, 3, 6, 3)])
def test_erase_and_add_matches_reference(B, Hw, N, W):
    rng = np.random.default_rng(N + Hw)
    M, w = rng.normal(size=(B, N, W)), simplex(rng, B, Hw, N) * rng.random((B, Hw, 1))
    e, a = rng.random((B, Hw, W)), rng.normal(size=(B, Hw, W))
    close(erase_and_add(t(M), t(w), t(e), t(a)), ref_erase_and_add(M, w, e, a))


def test_erase_and_add_gradcheck():
    rng = np.random.default_rng(2)
    args = (
        t(rng.normal(size=(2, 4, 3)), True),
        t(simplex(rng, 2, 2, 4), True),
        t(rng.random((2, 2, 3)), True),
        t(rng.normal(size=(2, 2, 3)), True),
    )
    assert torch.autograd.gradcheck(erase_and_add, args)


def test_one_hot_full_erase_overwrites_a_slot_and_leaves_the_rest():
    rng = np.random.default_rng(3)
    M = rng.normal(size=(1, 4, 3))
    w = np.zeros((1, 1, 4))
    w[0, 0, 1] = 1.0
    v = rng.normal(size=(1, 1, 3))
    out = erase_and_add(t(M), t(w), t(np.ones((1, 1, 3))), t(v)).numpy()
    np.testing.assert_allclose(out[0, 1], v[0, 0], **TOL)
    np.testing.assert_allclose(np.delete(out[0], 1, axis=0), np.delete(M[0], 1, axis=0), **TOL)
    # nothing written (w = 0): memory unchanged whatever e and a are
    close(erase_and_add(t(M), t(np.zeros((1, 2, 4))), t(rng.random((1, 2, 3))), t(rng.normal(size=(1, 2, 3)))), M)


def test_erasures_of_several_heads_commute():
    """NTM §3.2: erase-only writes of several heads give the same memory in any order."""
    rng = np.random.default_rng(4)
    M, w, e = t(rng.normal(size=(2, 5, 3))), t(simplex(rng, 2, 3, 5)), t(rng.random((2, 3, 3)))
    zero = torch.zeros(2, 1, 3, dtype=torch.float64)
    together = erase_and_add(M, w, e, torch.zeros(2, 3, 3, dtype=torch.float64))
    for order in ([0, 1, 2], [2, 0, 1]):
        one_by_one = M
        for h in order:
            one_by_one = erase_and_add(one_by_one, w[:, h : h + 1], e[:, h : h + 1], zero)
        close(one_by_one, together.numpy())


@pytest.mark.parametrize("B,N,W", [(1, 3, 2), (2, 5, 4)])
def test_deallocate_then_write_is_the_papers_equation_1(B, N, W):
    rng = np.random.default_rng(N)
    M, psi = rng.normal(size=(B, N, W)), rng.random((B, N))
    w, e, v = simplex(rng, B, 1, N) * 0.7, rng.random((B, 1, W)), rng.normal(size=(B, 1, W))
    close(deallocate(t(M), t(psi)), M * psi[..., None])
    got = erase_and_add(deallocate(t(M), t(psi)), t(w), t(e), t(v))
    close(got, ref_deallocated_write(M, psi, w, e, v))
    assert torch.autograd.gradcheck(deallocate, (t(M, True), t(psi, True)))


def test_freed_slot_is_erased_and_drops_out_of_content_lookup():
    """Csordás & Schmidhuber §3.2: a slot freed by a read (f = 1) is zeroed and no longer matches its key."""
    rng = np.random.default_rng(5)
    M = t(rng.normal(size=(1, 4, 6)))
    key = M[:, 2:3].clone()  # look for slot 2
    read_prev = t([[[0.0, 0.0, 1.0, 0.0]]])
    psi = A.retention(t([[1.0]]), read_prev)
    close(psi, [[1.0, 1.0, 0.0, 1.0]])
    before = A.content_weights(M, key, t([[20.0]]))
    after = A.content_weights(deallocate(M, psi), key, t([[20.0]]))
    assert before[0, 0].argmax() == 2 and before[0, 0, 2] > 0.9
    close(deallocate(M, psi)[0, 2], np.zeros(6))
    assert A.cosine_similarity(deallocate(M, psi), key)[0, 0, 2] == 0.0
    assert after[0, 0, 2] < before[0, 0, 2]
    # psi = 1 (nothing freed) leaves memory as it is
    close(deallocate(M, torch.ones(1, 4, dtype=torch.float64)), M.numpy())


def test_zero_memory_reads_and_writes_have_finite_gradients():
    M = torch.zeros(2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(2, 2, 4, dtype=torch.float64, requires_grad=True)
    e = torch.ones(2, 2, 3, dtype=torch.float64, requires_grad=True)
    a = torch.zeros(2, 2, 3, dtype=torch.float64, requires_grad=True)
    psi = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    new = erase_and_add(deallocate(M, psi), w, e, a)
    r = read(new, torch.full((2, 3, 4), 0.25, dtype=torch.float64))
    (r * torch.randn_like(r)).sum().backward()
    for x in (M, w, e, a, psi):
        assert x.grad is not None and torch.isfinite(x.grad).all()
