"""LSTM baseline with the models' interface (``initial_state``, ``step``, ``forward``); it has no memory.

The default size matches the default NTM's parameter count on the 8-bit copy task (input 9 = 8 bits + delimiter,
output 8): one layer of 120 units has 63,848 parameters; the default NTM (LSTM 100, 128 x 20 memory, one read
and one write head) has 62,936.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mann.config import check


@dataclass(frozen=True)
class LSTMConfig:
    hidden_size: int = 120  # units per layer; 120 x 1 ~ the default NTM's parameter count on copy (see above)
    layers: int = 1  # stacked LSTM layers
    forget_bias: float = 0.0  # added to every layer's forget-gate bias at initialisation (see add_forget_bias)

    def __post_init__(self):
        check(self.hidden_size > 0, "hidden_size", "a positive integer", self.hidden_size)
        check(self.layers > 0, "layers", "a positive integer", self.layers)


def add_forget_bias(cell: nn.LSTMCell | nn.LSTM, value: float) -> None:
    """Add ``value`` to the forget gate's share of the input bias of a cell (or of every layer of an nn.LSTM),
    in place; PyTorch's gate order is i, f, g, o. With the bias trained this is exactly TensorFlow's
    ``BasicLSTMCell(forget_bias=value)``, which adds the constant at every step."""
    if not value:
        return
    H = cell.hidden_size
    biases = [cell.bias_ih] if isinstance(cell, nn.LSTMCell) else [getattr(cell, f"bias_ih_l{k}")
                                                                     for k in range(cell.num_layers)]
    with torch.no_grad():
        for bias in biases:
            bias[H : 2 * H] += value


class LSTMState(NamedTuple):
    h: Tensor  # [layers, B, H]
    c: Tensor  # [layers, B, H]


class LSTMBaseline(nn.Module):
    def __init__(self, cfg: LSTMConfig, input_size: int, output_size: int):
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(input_size, cfg.hidden_size, cfg.layers, batch_first=True)
        add_forget_bias(self.lstm, cfg.forget_bias)
        self.output = nn.Linear(cfg.hidden_size, output_size)

    def initial_state(self, batch_size: int, memory_size: int | None = None) -> LSTMState:
        """Zeros on the model's device and dtype; ``memory_size`` is ignored (no external memory)."""
        zeros = self.output.weight.new_zeros(self.cfg.layers, batch_size, self.cfg.hidden_size)
        return LSTMState(zeros, zeros)

    def step(self, x: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """x: [B, I] -> (logits [B, O], next state)."""
        out, (h, c) = self.lstm(x.unsqueeze(1), (state.h, state.c))
        return self.output(out[:, 0]), LSTMState(h, c)

    def forward(self, x: Tensor, state: LSTMState | None = None, memory_size: int | None = None) -> Tensor:
        """x: [B, T, I] -> logits [B, T, O]; the whole sequence in one fused LSTM call (same result as ``step``)."""
        if state is None:
            state = self.initial_state(x.shape[0])
        out, _ = self.lstm(x, (state.h, state.c))
        return self.output(out)

