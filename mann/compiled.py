"""The compiled path: the model's own ``step`` through ``torch.compile``, the time loop in Python.

No maths of its own: the compiled function is the reference step (mann.ntm.NTM.step, mann.dnc.DNC.step), and
autograd differentiates the compiled graph. What compiling buys is launches and framework overhead: one step is
~50 (NTM) to ~100 (DNC) small ops forward, each a kernel launch on CUDA; inductor fuses them into a few kernels,
and on CUDA ``mode="reduce-overhead"`` replays the step as a CUDA graph (one launch per step).

The per-step function is compiled, not the unrolled sequence, so a new sequence length reuses the compiled
step; shapes are static (``dynamic=False``: one graph per batch size and memory size, what CUDA graphs need).
Models of one configuration share the compiled code (dynamo guards on the module's type and config, not on the
instance), so a worker compiles once per shape for all its trials. On CPU the same path runs on inductor's C++
backend, which is how tests check it against the reference without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Graphs per step function: one per batch size (training, the last evaluation batch) and memory size (the
# generalization scales), and two per shape (the first step's state is not the compiled graph's output). Past the
# limit dynamo runs the step uncompiled (correct, slower) rather than compiling on.
RECOMPILE_LIMIT = 32


def compile_step(model: nn.Module, cuda_graphs: bool):
    """``model.step`` compiled by inductor, replayed as CUDA graphs if ``cuda_graphs``."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(model.step, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)


def forward_fn(model: nn.Module, cuda_graphs: bool | None = None):
    """``model.forward`` with its step compiled: (x [B, T, I], state=None, memory_size=None) -> logits [B, T, O].
    ``cuda_graphs``: None: where the model's parameters are on CUDA."""
    graphs = next(model.parameters()).device.type == "cuda" if cuda_graphs is None else cuda_graphs
    step = compile_step(model, graphs)

    def forward(x: Tensor, state=None, memory_size: int | None = None) -> Tensor:
        if graphs:  # a new sequence: CUDA graph trees may reuse the previous one's output buffers from here on
            torch.compiler.cudagraph_mark_step_begin()
        if state is None:
            state = model.initial_state(x.shape[0], memory_size)
        # time-major and contiguous: every x_t is [B, I] with strides (I, 1) whatever T is (x[:, t] of [B, T, I]
        # would have strides (T I, 1), and static shapes guard on strides: a recompile per sequence length)
        ys = []
        for x_t in x.transpose(0, 1).contiguous().unbind(0):
            y, state = step(x_t, state)
            ys.append(y)
        return torch.stack(ys, dim=1)

    return forward
