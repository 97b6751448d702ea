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

This module is the entry point, :func:`forward`; :mod:`mann.fast_ntm` and :mod:`mann.fast_dnc` hold each
architecture's step, its reverse, and the ``autograd.Function`` over the sequence, and :mod:`mann.fast_shared` what
both share (the kernels' loading, the linear maps of one model or of stacked seeds, the output layer's backward).
:mod:`mann.dispatch` decides when this path runs.

Conventions: per-step tensors are kept in lists over time; tensors over all steps are batch-major (``[B, T, ...]``,
the models' layout); ``g*`` is the gradient of the loss w.r.t. ``*``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mann.dnc import DNC
from mann.ntm import NTM


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
