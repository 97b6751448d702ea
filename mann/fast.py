"""Fast paths: the NTM's and the DNC's whole sequence as one autograd node with a hand-written backward.

Why. On a CPU the reference models spend most of a training step in framework overhead, not arithmetic:
a time step is ~50 (NTM) to ~100 (DNC) small tensor ops forward, each recorded by autograd and each with
its own backward node, and the tensors are tiny (batch 16). Here the forward loop runs with autograd off
and keeps only what the backward needs; the backward is back-propagation through time written out by hand
(a few ops per mechanism per step), and every weight gradient is one matmul over all time steps at once
instead of one per step. The models' maths and parameters are unchanged: :mod:`tests.test_fast` checks the
logits and every gradient against the reference models in float64.

Layout: this module holds the mechanisms both models share, as forward/backward pairs without autograd
(content weighting, LSTM cell, softmax, output layer), and the dispatch: :func:`forward` runs a model's
fast path, :func:`use_fast` is the ``impl: "auto"`` rule, :func:`unsupported` says why a model has none.
:mod:`mann.fast_ntm` and :mod:`mann.fast_dnc` hold each architecture's step, its reverse, and the
``autograd.Function`` over the sequence.

Conventions: per-step tensors are kept in lists over time; tensors over all steps are batch-major (``[B, T, ...]``,
the models' layout); ``g*`` is the gradient of the loss w.r.t. ``*``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: above it softplus(x) = x (derivative 1)
CONTENT_EPS = 1e-6  # mann.addressing.cosine_similarity's eps
SHARPEN_EPS = 1e-12  # mann.addressing.sharpen's eps


# ----------------------------------------------------------------------------------------------------------------
# Shared mechanics: forward values and their backward, no autograd


ONE_THREAD_BELOW = 2**18  # numbers in a step's largest tensor under which its loop runs on one thread


@contextlib.contextmanager
def one_thread(x: Tensor, largest: int, kernels: object | None = None) -> Iterator[None]:
    """Run the body (a loop over time steps whose largest tensor holds ``largest`` numbers) on one intra-op CPU
    thread if that is small and ``kernels`` is None; the caller's thread count is restored after.

    ATen splits ops of more than ~32k numbers across its threads. For a step's small ops the fork and join cost
    more than the split saves: bench/step.py at 2 threads ran the DNC N=64 step (link matrices of 65k numbers)
    in 116 ms and 232 ms of CPU, on one thread in 81-85 ms. At N=256 (1M numbers) two threads were faster
    (236-244 against 355-451 ms), hence the size limit. The all-steps matmuls outside the loops (input projection,
    output layer, weight gradients) keep every thread. No effect on CUDA tensors.

    With mann/csrc's kernels (``kernels`` not None) every thread stays: they split their batch rows across
    threads only where a row is enough work (their grain), and did most of the loop's work. bench/step.py at 2
    threads: NTM 12.5-13.8 ms with both threads against 18.7-18.9 on one, DNC N=64 24.4-26.3 against 37.8-39.3.
    """
    threads = torch.get_num_threads()
    if x.device.type != "cpu" or threads == 1 or largest >= ONE_THREAD_BELOW or kernels is not None:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fused_kernels(x: Tensor, *names: str) -> tuple | None:
    """mann/csrc's kernel modules ``names`` (built by mann.native) where they run for ``x``: CPU tensors of
    float32/64, every one of them built. Else None: the fast path's PyTorch ops run."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    from mann import native

    modules = tuple(native.kernels(name) for name in names)
    return None if any(m is None for m in modules) else modules


def softmax_backward(y: Tensor, gy: Tensor) -> Tensor:
    """y = softmax(z) along the last dim; dz = y * (gy - sum(gy * y)).

    torch._softmax_backward_data is the one-op kernel autograd itself runs for softmax: ~2x faster here than the
    four ops of the formula (the fast paths call this 3-5 times per time step)."""
    return torch._softmax_backward_data(gy, y, -1, y.dtype)


def slot_norm(x: Tensor) -> Tensor:
    """|x| along the last dim, floored at sqrt(smallest normal) as mann.addressing's norm is (its gradient is then
    x / |x| wherever x is not ~0)."""
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(torch.finfo(x.dtype).tiny ** 0.5)


def _sqrt_floor(squares: Tensor) -> Tensor:
    """sqrt(max(squares, smallest normal)): mann.addressing's norm from a sum of squares."""
    return squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt()


def content_forward(memory: Tensor, keys: Tensor, strengths: Tensor, mask: Tensor | None = None,
                    mem_norm: Tensor | None = None) -> tuple[Tensor, tuple]:
    """Content weighting softmax(beta * D(k, M[i])) (NTM Eq. 5-6; DNC C(M, k, beta)) and what backward needs.

    memory: [B, N, W]; keys: [B, H, W]; strengths: [B, H, 1]; mask [B, H, W] or None (Csordás & Schmidhuber's
    masked D(k * m, M[i] * m)) -> ([B, H, N], saved). Without a mask, ``mem_norm`` [B, 1, N] may pass |M[i]| in
    when it is already known (``saved[4]`` of an earlier call on the same memory).
    """
    if mask is None:
        m2 = masked_keys = None
        key_norm = slot_norm(keys)[..., None]  # [B, H, 1]
        if mem_norm is None:
            mem_norm = slot_norm(memory)[:, None, :]  # [B, 1, N]
    else:
        m2 = mask.square()
        masked_keys = keys * m2  # (k m) . (M[i] m) = (k m^2) . M[i]
        key_norm = _sqrt_floor((keys * masked_keys).sum(-1, keepdim=True))
        mem_norm = _sqrt_floor(torch.bmm(m2, memory.square().transpose(1, 2)))  # [B, H, N]
    denom = key_norm * mem_norm + CONTENT_EPS  # eps outside the product, as the reference
    dot = torch.bmm(keys if mask is None else masked_keys, memory.transpose(1, 2))
    similarity = dot / denom  # D: [B, H, N]
    w = torch.softmax(strengths * similarity, dim=-1)
    return w, (memory, keys, strengths, key_norm, mem_norm, denom, similarity, w, mask, m2, masked_keys)


def content_backward(gw: Tensor, saved: tuple, acc: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients (memory [B, N, W], keys [B, H, W], strengths [B, H, 1], mask [B, H, W] or None) of
    :func:`content_forward`; ``acc`` [B, N, W], if given, is added to the memory's (in the same op where it can).
    Norms: d|x|/dx = x / |x|; below the floor x is ~0 and so is the gradient."""
    memory, keys, strengths, key_norm, mem_norm, denom, similarity, w, mask, m2, masked_keys = saved
    gz = softmax_backward(w, gw)
    g_strengths = (gz * similarity).sum(-1, keepdim=True)
    g_dot = gz * strengths / denom  # D = dot / denom
    g_denom = g_dot * similarity  # = -dL/d denom: the sign is folded into the subtractions below
    g_key_norm = (g_denom * mem_norm).sum(-1, keepdim=True) / key_norm  # [B, H, 1], negated, over |k|
    if mask is None:
        g_keys = torch.addcmul(torch.bmm(g_dot, memory), keys, g_key_norm, value=-1)
        # [B, 1, N], negated, over |M[i]|: sum_h g_denom_h |k_h|
        g_mem_norm = (g_denom * key_norm if keys.shape[1] == 1 else torch.bmm(key_norm.transpose(1, 2), g_denom))
        g_mem_norm = g_mem_norm / mem_norm
        # g_dot^T k (+ acc); one head: an outer product, which broadcasting runs ~3x faster than bmm here
        g_dot_t = g_dot.transpose(1, 2)
        if keys.shape[1] == 1:
            g_dot_keys = g_dot_t * keys if acc is None else torch.addcmul(acc, g_dot_t, keys)
        else:
            g_dot_keys = torch.bmm(g_dot_t, keys) if acc is None else torch.baddbmm(acc, g_dot_t, keys)
        g_memory = torch.addcmul(g_dot_keys, memory, g_mem_norm.transpose(1, 2), value=-1)
        return g_memory, g_keys, g_strengths, None
    g_masked_keys = torch.bmm(g_dot, memory)  # d(k m^2)
    g_mem_norm = g_denom * key_norm / mem_norm  # [B, H, N], negated
    g_keys = g_masked_keys * m2 - g_key_norm * masked_keys
    g_m2 = (g_masked_keys * keys - 0.5 * g_key_norm * keys.square()
            - 0.5 * torch.bmm(g_mem_norm, memory.square()))
    g_memory = torch.bmm(g_dot.transpose(1, 2), masked_keys) - memory * torch.bmm(g_mem_norm.transpose(1, 2), m2)
    return g_memory if acc is None else g_memory + acc, g_keys, g_strengths, 2 * mask * g_m2


def write_forward(memory: Tensor, ww: Tensor, erase: Tensor, add: Tensor) -> tuple[Tensor, tuple]:
    """M_t = M * prod_h (1 - w_h e_h^T) + sum_h w_h a_h^T (NTM Eqs. 3-4; DNC write), and what backward needs.

    memory: [B, N, W]; ww: [B, Hw, N]; erase, add: [B, Hw, W] -> [B, N, W]. With one write head it is computed
    as M + w (a - M e)^T: three passes over the memory instead of four.
    """
    if ww.shape[1] == 1:
        update = add - memory * erase  # [B, N, W]: a_j - M_ij e_j
        return torch.addcmul(memory, ww[:, 0, :, None], update), (memory, ww, erase, add, update)
    factors = 1 - ww[..., None] * erase[:, :, None, :]  # [B, Hw, N, W]
    M = torch.baddbmm(memory * torch.prod(factors, dim=1), ww.transpose(1, 2), add)
    return M, (memory, ww, erase, add, factors)


def write_backward(gM: Tensor, saved: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (memory, ww, erase, add) of :func:`write_forward` from that of M_t [B, N, W]."""
    memory, ww, erase, add, extra = saved
    g_add = torch.bmm(ww, gM)  # d a_h = w_h^T gM
    if ww.shape[1] == 1:
        g_erase = -torch.bmm(ww, gM * memory)  # d e_j = -sum_i gM_ij w_i M_ij
        g_memory = torch.addcmul(gM, ww[:, 0, :, None], gM * erase, value=-1)  # gM (1 - w e^T)
        g_ww = (gM * extra).sum(-1)[:, None]  # gM . (a - M e) per slot
        return g_memory, g_ww, g_erase, g_add
    factors = extra
    keep = torch.prod(factors, dim=1)
    g_factor = (gM * memory)[:, None] * prod_others(factors, 1)  # d/d(1 - w_h e_h^T)
    g_erase = -(ww[:, :, None, :] @ g_factor).squeeze(2)
    g_ww = torch.bmm(gM, add.transpose(1, 2)).transpose(1, 2) - (g_factor @ erase[..., None]).squeeze(-1)
    return gM * keep, g_ww, g_erase, g_add


def lstm_forward(pre: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """nn.LSTMCell's update from its pre-activations (gate order i, f, g, o).

    pre: [B, 4C]; c_prev: [B, C] -> (h, c, act [B, 4C] = (i, f, g, o) activated, tanh(c)).
    """
    C = c_prev.shape[1]
    act = torch.sigmoid(pre)
    act[:, 2 * C : 3 * C] = torch.tanh(pre[:, 2 * C : 3 * C])
    i, f, g, o = act.split(C, dim=1)
    c = torch.addcmul(f * c_prev, i, g)
    tanh_c = torch.tanh(c)
    return o * tanh_c, c, act, tanh_c


def lstm_backward_constants(act: Tensor, c_prev: Tensor, tanh_c: Tensor) -> tuple[Tensor, ...]:
    """What the LSTM backward needs that does not depend on the incoming gradient, for all steps at once.

    act [T, B, 4C] (activated i, f, g, o), c_prev [T, B, C], tanh_c [T, B, C] -> per-step tensors
    (o (1 - tanh(c)^2) [B, C], (g, c_{t-1}, i) [B, 3, C], tanh(c) [B, C], d act/d pre [B, 4C], f [B, C]),
    each as a tuple over t.
    """
    C = c_prev.shape[-1]
    i, f, g, o = act.split(C, dim=-1)
    o_dtanh = o * (1 - tanh_c.square())  # dh/dc
    g_c_i = torch.stack([g, c_prev, i], dim=2)  # dc -> (di, df, dg) = dc * (g, c_{t-1}, i), in gate order
    dact = act * (1 - act)
    dact[..., 2 * C : 3 * C] = 1 - g.square()
    return tuple(zip(o_dtanh.unbind(0), g_c_i.unbind(0), tanh_c.unbind(0), dact.unbind(0), f.unbind(0), strict=True))


def lstm_step_backward(gh: Tensor, gc: Tensor, o_dtanh, g_c_i, tanh_c, dact, f) -> tuple[Tensor, Tensor]:
    """(gradient of the pre-activations [B, 4C], of c_{t-1} [B, C]) from those of h_t and c_t."""
    gc = torch.addcmul(gc, gh, o_dtanh)
    g_ifg = gc[:, None, :] * g_c_i
    g_pre = torch.cat([g_ifg.flatten(1), gh * tanh_c], dim=1) * dact
    return g_pre, gc * f


def prod_others(factors: Tensor, dim: int) -> Tensor:
    """prod_{k != j} factors[k] for every j along ``dim``, with no division (a factor can be exactly 0)."""
    n = factors.shape[dim]
    if n == 1:
        return torch.ones_like(factors)
    ones = torch.ones_like(factors.narrow(dim, 0, 1))
    before = torch.cumprod(torch.cat([ones, factors.narrow(dim, 0, n - 1)], dim), dim)
    flipped = factors.flip(dim)
    after = torch.cumprod(torch.cat([ones, flipped.narrow(dim, 0, n - 1)], dim), dim).flip(dim)
    return before * after


def flatten_tree(items: list) -> tuple[list, list]:
    """Nested tuples/lists/dicts of tensors (or None) -> one flat list, and the structure to rebuild them.

    autograd.Function.save_for_backward takes a flat list; saving through it (rather than on ctx) is what lets
    saved_tensors_hooks see, and count, every byte kept for backward.
    """
    flat: list = []

    def walk(v):
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return _rebuild(v, [walk(x) for x in v])
        flat.append(v)
        return len(flat) - 1

    return flat, [walk(item) for item in items]


def unflatten_tree(spec, flat):
    if isinstance(spec, dict):
        return {k: unflatten_tree(v, flat) for k, v in spec.items()}
    if isinstance(spec, list | tuple):
        return _rebuild(spec, [unflatten_tree(v, flat) for v in spec])
    return flat[spec]


def _rebuild(like, items: list):
    """A list, tuple or NamedTuple of the same type as ``like`` holding ``items``."""
    if hasattr(like, "_fields"):
        return type(like)(*items)
    return type(like)(items)


def clip_pass(raw: Tensor, clip: float | None) -> Tensor | float:
    """Where clamp(raw, -clip, clip) passes the gradient (torch: -clip <= raw <= clip), as 0/1."""
    return 1.0 if clip is None else ((raw >= -clip) & (raw <= clip)).to(raw.dtype)


def output_backward(gy: Tensor, y_raw: Tensor, hr: Tensor, w_out: Tensor, clip: float | None):
    """Back through y = clip(W_o [h, r] + b_o) for all steps at once. gy, y_raw [B, T, O]; hr [B, T, C + R W]
    -> (gradient of hr [B, T, C + R W], of W_o, of b_o)."""
    gy = gy * clip_pass(y_raw, clip)
    return linear(gy, w_out), weight_grad(gy, hr, w_out), bias_grad(gy, w_out)


# ----------------------------------------------------------------------------------------------------------------
# Linear maps of one model, or of S seeds at once (mann.multiseed). A weight with a leading seed axis, [S, ...],
# applies to S equal blocks of rows: rows s*B .. (s+1)*B - 1 of a [S*B, ...] batch through seed s's weights (one
# bmm for all seeds). Everything else in the fast paths is per row already, so this is all that seeds change.
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
# Dispatch


def unsupported(model) -> str | None:
    """Why ``model`` has no fast path (None: it has one).

    The fast paths read the weights of the model's own layers (or take them as ``params``), so a model whose
    layers were swapped (e.g. mann.multiseed's folded copy for other models) runs its reference code.
    """
    from torch import nn

    from mann.dnc import DNC
    from mann.ntm import NTM

    if not isinstance(model, NTM | DNC):
        return f"no fast path for {type(model).__name__}"
    controller = (nn.LSTMCell,) if isinstance(model, DNC) or model.cfg.controller == "lstm" else (nn.Linear,)
    layers = {"controller": controller, "interface": (nn.Linear,), "output": (nn.Linear,)}
    for name, types in layers.items():
        layer = getattr(model, name, None)
        if type(layer) not in types:
            return f"{type(model).__name__}.{name} is a {type(layer).__name__}, not {types[0].__name__}"
    return None


def use_fast(model, x: Tensor) -> bool:
    """Whether a model whose config says ``impl: "auto"`` should take the fast path for input ``x``.

    Only where it was measured to be faster (docs/performance.md): on CPU. On CUDA it has not been measured
    yet, so "auto" keeps the reference code there; ``impl: "fast"`` forces it.
    """
    if unsupported(model) is not None:
        return False
    impl = getattr(model.cfg, "impl", "auto")
    if impl == "reference":
        return False
    return impl == "fast" or x.device.type == "cpu"


def forward(model, x: Tensor, state=None, memory_size: int | None = None, params=None) -> Tensor:
    """model(x, state, memory_size) through the fast path; x [B, T, I] -> logits [B, T, O].

    ``params``: weights to use instead of the model's, named by :func:`param_names` (same order), each either of
    the model's shape or stacked for S seeds ([S, ...]; x, state and logits then hold S blocks of B/S rows, block s
    run with seed s's weights: how mann.multiseed trains many seeds at once).
    """
    from mann.ntm import NTM

    why = unsupported(model)
    if why is not None:
        raise ValueError(why)
    if isinstance(model, NTM):
        from mann.fast_ntm import ntm_forward

        return ntm_forward(model, x, state, memory_size, params)
    from mann.fast_dnc import dnc_forward

    return dnc_forward(model, x, state, memory_size, params)


def param_names(model) -> tuple[str, ...]:
    """The names of the parameters the fast path of ``model`` differentiates, in the order ``forward`` takes them."""
    from mann.ntm import NTM

    if isinstance(model, NTM):
        from mann.fast_ntm import param_names as names
    else:
        from mann.fast_dnc import param_names as names
    return names(model)
