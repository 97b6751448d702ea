"""Differentiable Neural Computer (Graves et al. 2016), with the three fixes of Csordás & Schmidhuber (2019).

One time step, top to bottom (``DNC.step``), in the paper's Methods order:

1. the LSTM controller reads ``[x_t, r_{t-1}]`` and emits h_t;
2. the interface vector ξ_t = W_ξ h_t (clipped to ±``clip_value``) is split into its parts;
3. dynamic memory allocation: retention ψ_t, usage u_t, allocation a_t;
4. write weighting w^w_t from content (on M_{t-1}) and allocation; erase and write give M_t;
5. temporal link L_t and precedence p_t; forward/backward weightings f_t, b_t from w^r_{t-1};
6. read weighting w^r_t from b_t, content (on M_t) and f_t by the read modes π_t; read r_t from M_t;
7. y_t = W_y h_t + W_r r_t (one layer on [h_t, r_t]; clipped like ξ_t).

The Csordás & Schmidhuber variants are flags of one config (``mann.registry`` presets):
``masking`` multiplies key and memory by a learned mask in every content look-up (floored at ``mask_min``),
``deallocation`` scales freed memory by ψ_t before the write, ``sharpness`` raises the forward and backward
weightings to learned powers s^f_t, s^b_t >= 1 and renormalises. Their interface parts come after the paper's
parts, so a variant's interface layer holds the plain DNC's as its first rows.

Memory, usage, link, weightings and reads all start at zero (content look-up is finite there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mann import addressing, memory
from mann.config import ConfigError, check
from mann.lstm import add_forget_bias


@dataclass(frozen=True)
class DNCConfig:
    controller_size: int = 128  # hidden units of the LSTM controller
    memory_size: int = 64  # N: memory slots
    word_size: int = 32  # W: width of a memory slot
    read_heads: int = 4  # R
    write_heads: int = 1  # Hw (the paper has one; more write heads allocate one after the other)
    masking: bool = False  # key/value masking in content look-up (Csordás & Schmidhuber 2019)
    deallocation: bool = False  # erase freed memory: M_{t-1} ∘ ψ_t before writing (ibid.)
    sharpness: bool = False  # link distribution sharpness control of f_t, b_t (ibid.)
    # floor of the masks: m = mask_min + (1 - mask_min) sigmoid(.), so no channel is ever masked out entirely
    # (Csordás & Schmidhuber's code; 0.1 in their associative-recall runs, 0 elsewhere); no effect without masking
    mask_min: float = 0.0
    clip_value: float | None = 20.0  # clip ξ_t and the output logits to ±clip_value (DeepMind's default; None: off)
    # added to the LSTM controller's forget-gate bias at initialisation (Csordás & Schmidhuber's code sets it to 1)
    forget_bias: float = 0.0

    def __post_init__(self):
        for key in ("controller_size", "memory_size", "word_size", "read_heads", "write_heads"):
            check(getattr(self, key) > 0, key, "a positive integer", getattr(self, key))
        check(self.clip_value is None or self.clip_value > 0, "clip_value", "a positive number or null",
              self.clip_value)
        check(0 <= self.mask_min < 1, "mask_min", "a number in [0, 1)", self.mask_min)


class DNCState(NamedTuple):
    memory: Tensor  # M_t: [B, N, W]
    read_weights: Tensor  # w^r_t: [B, R, N]
    write_weights: Tensor  # w^w_t: [B, Hw, N]
    link: Tensor  # L_t: [B, Hw, N, N], one temporal link matrix per write head
    precedence: Tensor  # p_t: [B, Hw, N]
    usage: Tensor  # u_t: [B, N]
    reads: Tensor  # r_t: [B, R, W]
    controller: tuple[Tensor, Tensor]  # LSTM (h [B, C], c [B, C])


def oneplus(x: Tensor) -> Tensor:
    """oneplus(x) = 1 + log(1 + e^x), in [1, inf) (DNC, Methods)."""
    return 1 + F.softplus(x)


def floored_mask(x: Tensor, mask_min: float) -> Tensor:
    """m = mask_min + (1 - mask_min) sigmoid(x), in [mask_min, 1): a content-addressing mask whose channels never
    drop below ``mask_min`` (Csordás & Schmidhuber's code: ``mask * (1 - mask_min) + mask_min``)."""
    m = torch.sigmoid(x)
    return m if mask_min == 0 else mask_min + (1 - mask_min) * m


class DNC(nn.Module):
    def __init__(self, cfg: DNCConfig, input_size: int, output_size: int):
        super().__init__()
        self.cfg = cfg
        W, R, Hw, C = cfg.word_size, cfg.read_heads, cfg.write_heads, cfg.controller_size
        self.controller = nn.LSTMCell(input_size + R * W, C)
        add_forget_bias(self.controller, cfg.forget_bias)
        # ξ_t in the paper's order: read keys, read strengths, write keys, write strengths, erase vectors,
        # write vectors, free gates, allocation gates, write gates, read modes; then the variants' parts.
        self.interface_sizes = [R * W, R, Hw * W, Hw, Hw * W, Hw * W, R, Hw, Hw, R * (2 * Hw + 1)]
        if cfg.masking:
            self.interface_sizes += [R * W, Hw * W]  # read masks, write masks
        if cfg.sharpness:
            self.interface_sizes += [R, R]  # link sharpness s^f_t, s^b_t per read head
        self.interface = nn.Linear(C, sum(self.interface_sizes))
        self.output = nn.Linear(C + R * W, output_size)

    # -- state -----------------------------------------------------------------------------------------------------

    def initial_state(self, batch_size: int, memory_size: int | None = None) -> DNCState:
        """All zeros, on the model's device and dtype. No parameter depends on N, so any ``memory_size`` works."""
        cfg = self.cfg
        n = cfg.memory_size if memory_size is None else memory_size
        if n < 1:
            raise ConfigError("memory_size", "a positive integer", n)
        ref = self.output.weight
        B, R, Hw, W, C = batch_size, cfg.read_heads, cfg.write_heads, cfg.word_size, cfg.controller_size
        zeros = ref.new_zeros
        return DNCState(
            memory=zeros(B, n, W),
            read_weights=zeros(B, R, n),
            write_weights=zeros(B, Hw, n),
            link=zeros(B, Hw, n, n),
            precedence=zeros(B, Hw, n),
            usage=zeros(B, n),
            reads=zeros(B, R, W),
            controller=(zeros(B, C), zeros(B, C)),
        )

    # -- one time step ---------------------------------------------------------------------------------------------

    def step(self, x: Tensor, state: DNCState) -> tuple[Tensor, DNCState]:
        """x: [B, I] -> (logits [B, O], next state)."""
        cfg = self.cfg
        B, R, Hw, W = x.shape[0], cfg.read_heads, cfg.write_heads, cfg.word_size

        # 1. Controller, fed the input AND the previous read vectors r_{t-1}.
        h, c = self.controller(torch.cat([x, state.reads.flatten(1)], dim=1), state.controller)

        # 2. Interface vector ξ_t, split and squashed as in the paper (Methods, "Interface parameters").
        xi = self._clip(self.interface(h))
        parts = torch.split(xi, self.interface_sizes, dim=1)
        read_keys = parts[0].view(B, R, W)  # k^r_t
        read_strengths = oneplus(parts[1])  # β^r_t: [B, R]
        write_keys = parts[2].view(B, Hw, W)  # k^w_t
        write_strengths = oneplus(parts[3])  # β^w_t: [B, Hw]
        erase = torch.sigmoid(parts[4]).view(B, Hw, W)  # e_t
        write_vectors = parts[5].view(B, Hw, W)  # v_t
        free_gates = torch.sigmoid(parts[6])  # f_t: [B, R]
        alloc_gates = torch.sigmoid(parts[7])  # g^a_t: [B, Hw]
        write_gates = torch.sigmoid(parts[8])  # g^w_t: [B, Hw]
        read_modes = torch.softmax(parts[9].view(B, R, 2 * Hw + 1), dim=-1)  # π_t: backward heads, content, forward
        read_masks = write_masks = forward_sharpness = backward_sharpness = None
        if cfg.masking:
            read_masks = floored_mask(parts[10], cfg.mask_min).view(B, R, W)
            write_masks = floored_mask(parts[11], cfg.mask_min).view(B, Hw, W)
        if cfg.sharpness:
            forward_sharpness, backward_sharpness = oneplus(parts[-2]), oneplus(parts[-1])  # s^f_t, s^b_t: [B, R]

        # 3. Dynamic memory allocation, from the previous step's weightings.
        psi = addressing.retention(free_gates, state.read_weights)  # ψ_t: [B, N]
        usage = addressing.update_usage(state.usage, state.write_weights, psi)  # u_t
        # With several write heads each allocates from the usage the heads before it leave, as far as their
        # writes go through allocation (g^w g^a, as DeepMind's multi-write DNC); Hw = 1 is the paper's a_t.
        allocation = addressing.write_allocations(usage, write_gates * alloc_gates)  # a_t: [B, Hw, N]

        # 4. Write weighting and write.
        write_content = addressing.content_weights(state.memory, write_keys, write_strengths, mask=write_masks)
        write_w = addressing.write_weights(write_content, allocation, alloc_gates, write_gates)
        M = state.memory
        if cfg.deallocation:
            M = memory.deallocate(M, psi)  # freed slots really are emptied, so content look-up cannot find them
        M = memory.erase_and_add(M, write_w, erase, write_vectors)

        # 5. Temporal links: L_t uses p_{t-1}; directional weightings use w^r_{t-1}.
        link = addressing.update_link(state.link, state.precedence, write_w)
        precedence = addressing.update_precedence(state.precedence, write_w)
        forward, backward = addressing.directional_weights(
            link, state.read_weights, forward_sharpness, backward_sharpness=backward_sharpness
        )

        # 6. Read weighting and read from M_t.
        read_content = addressing.content_weights(M, read_keys, read_strengths, mask=read_masks)
        read_w = addressing.read_weights(backward, read_content, forward, read_modes)
        reads = memory.read(M, read_w)

        # 7. y_t = W_y h_t + W_r r_t.
        y = self._clip(self.output(torch.cat([h, reads.flatten(1)], dim=1)))
        return y, DNCState(M, read_w, write_w, link, precedence, usage, reads, (h, c))

    def forward(self, x: Tensor, state: DNCState | None = None, memory_size: int | None = None) -> Tensor:
        """x: [B, T, I] -> logits [B, T, O]. ``memory_size`` only applies when ``state`` is None."""
        if state is None:
            state = self.initial_state(x.shape[0], memory_size)
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1)

    def _clip(self, t: Tensor) -> Tensor:
        v = self.cfg.clip_value
        return t if v is None else t.clamp(-v, v)
