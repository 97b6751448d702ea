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

# bounded recompiles per step function: batch sizes of training and evaluation, memory sizes of the generalization
# scales; beyond this dynamo falls back to running the step uncompiled (correct, slower) rather than compiling on
CACHE_LIMIT = 32


def compile_step(model: nn.Module):
    """``model.step`` compiled for its parameters' device: CUDA graphs on CUDA, inductor's default elsewhere."""
    device = next(model.parameters()).device
    mode = "reduce-overhead" if device.type == "cuda" else None
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_LIMIT)
    return torch.compile(model.step, mode=mode, dynamic=False)


def forward_fn(model: nn.Module):
    """``model.forward`` with its step compiled: (x [B, T, I], state=None, memory_size=None) -> logits [B, T, O]."""
    step = compile_step(model)
    cuda = next(model.parameters()).device.type == "cuda"

    def forward(x: Tensor, state=None, memory_size: int | None = None) -> Tensor:
        if cuda:  # a new sequence: CUDA graph trees may reuse the previous one's output buffers from here on
            torch.compiler.cudagraph_mark_step_begin()
        if state is None:
            state = model.initial_state(x.shape[0], memory_size)
        ys = []
        for t in range(x.shape[1]):
            y, state = step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1)

    return forward
