"""Neural Turing Machine (Graves, Wayne & Danihelka 2014), with the choices of Collier & Beel (2018).

One time step, top to bottom (``NTM.step``):

1. the controller (LSTM or feedforward) reads ``[x_t, r_{t-1}]``;
2. one linear layer emits every head's parameters (key k, strength β, gate g, shift s, sharpening γ;
   write heads also erase e and add a), clipped to ±``clip_value`` before their activations;
3. every head addresses ``M_{t-1}`` (content -> interpolate -> shift -> sharpen, Sec. 3.3), all heads at once;
4. read heads read ``r_t`` from ``M_{t-1}``; write heads erase and add to give ``M_t`` (Sec. 3.1, 3.2);
5. ``y_t = W_o [h_t, r_t]``, clipped like the head parameters.

Reading before writing, and clipping, tanh keys and tanh add vectors follow Collier & Beel, who found
this the stable recipe. ``NTMConfig.memory_init`` chooses the initial memory M_0 [N, W]:

- ``constant``: every entry 1e-6, fixed (not trained);
- ``learned``: tanh(P), P an [N, W] parameter drawn Glorot-uniform, trained;
- ``random``: tanh of N(0, 0.5²), drawn afresh for every sequence, not trained;
- ``constant_trained``: P, an [N, W] parameter starting at 1e-6 everywhere, trained (no tanh);
- ``random_trained``: tanh(P), P an [N, W] parameter drawn once from N(0, 0.5²), trained.

Collier & Beel's published code (ntm.py, ``zero_state``) builds all three of its schemes as TensorFlow
variables (``tf.get_variable``, trainable by default) and its run_tasks.py updates every trainable variable, so
what it runs as "constant", "learned" and "random" is ``constant_trained``, ``learned`` and ``random_trained``
here; ``constant`` and ``random`` are the untrained readings of the names. The initial read vectors and
weightings are always learned, as in their code (r_0 = tanh(p), w_0 = softmax(q), p and q Glorot-uniform vectors:
a uniform weighting over a constant memory would never tell the slots apart); the controller starts at zero.

``NTMConfig.layer_init`` chooses the starting weights of the controller, interface and output layers: PyTorch's
defaults (``pytorch``), or those of Collier & Beel's TensorFlow code (``tensorflow``: truncated-normal interface
and output kernels, a Glorot-uniform LSTM kernel, zero biases; ``tensorflow_layer_init``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mann import addressing, memory
from mann.config import ConfigError, check
from mann.lstm import add_forget_bias

MEMORY_INIT_CONSTANT = 1e-6  # Collier & Beel's "small constant"; also fills rows added beyond a learned memory
RANDOM_INIT_STD = 0.5  # random schemes: M(i, j) = tanh(N(0, 0.5²)) (random: per sequence; random_trained: once)
TRAINED_INITS = ("learned", "constant_trained", "random_trained")  # schemes whose M_0 is a parameter


@dataclass(frozen=True)
class NTMConfig:
    controller: Literal["lstm", "feedforward"] = "lstm"  # the paper tried both; LSTM learns copy more reliably
    controller_size: int = 100  # hidden units of the controller (Graves 2014 used 100 for copy)
    memory_size: int = 128  # N: memory slots
    word_size: int = 20  # W: width of a memory slot
    read_heads: int = 1  # R
    write_heads: int = 1  # Hw
    shift_range: int = 1  # k: a head can shift by -k..k slots per step (2k+1 shift weights)
    # M_0, see the module docstring; Collier & Beel's code trains its constant (1e-6) memory: "constant_trained"
    memory_init: Literal["constant", "learned", "random", "constant_trained", "random_trained"] = "constant"
    clip_value: float | None = 20.0  # clip head parameters and output logits to ±clip_value (None: no clip)
    # added to the LSTM controller's forget-gate bias at initialisation (mann.lstm.add_forget_bias); Collier &
    # Beel's code runs TensorFlow's BasicLSTMCell(forget_bias=1.0), which this reproduces exactly
    forget_bias: float = 0.0
    # the starting weights of the controller, interface and output layers: PyTorch's defaults, or those of
    # Collier & Beel's TensorFlow code (see tensorflow_layer_init)
    layer_init: Literal["pytorch", "tensorflow"] = "pytorch"

    def __post_init__(self):
        for key in ("controller_size", "memory_size", "word_size", "read_heads", "write_heads"):
            check(getattr(self, key) > 0, key, "a positive integer", getattr(self, key))
        check(self.shift_range >= 0, "shift_range", "a non-negative integer", self.shift_range)
        check(2 * self.shift_range + 1 <= self.memory_size, "shift_range",
              f"2 * shift_range + 1 <= memory_size ({self.memory_size})", self.shift_range)
        check(self.clip_value is None or self.clip_value > 0, "clip_value", "a positive number or null",
              self.clip_value)
        check(self.forget_bias == 0 or self.controller == "lstm", "forget_bias", "0 with a feedforward controller",
              self.forget_bias)
        check(self.layer_init in ("pytorch", "tensorflow"), "layer_init", "pytorch or tensorflow", self.layer_init)


class NTMState(NamedTuple):
    memory: Tensor  # M_t: [B, N, W]
    read_weights: Tensor  # w^r_t: [B, R, N]
    write_weights: Tensor  # w^w_t: [B, Hw, N]
    reads: Tensor  # r_t: [B, R, W]
    controller: tuple[Tensor, ...]  # LSTM: (h [B, C], c [B, C]); feedforward: () (no recurrent state)


class NTM(nn.Module):
    def __init__(self, cfg: NTMConfig, input_size: int, output_size: int):
        super().__init__()
        self.cfg = cfg
        N, W, R, Hw, C = cfg.memory_size, cfg.word_size, cfg.read_heads, cfg.write_heads, cfg.controller_size
        heads = R + Hw
        controller_in = input_size + R * W
        if cfg.controller == "lstm":
            self.controller = nn.LSTMCell(controller_in, C)
        else:
            self.controller = nn.Linear(controller_in, C)
        # Per head: k (W), β, g, s (2k+1), γ; then per write head: e (W), a (W). One fused layer for all.
        self.head_params = W + 3 + (2 * cfg.shift_range + 1)
        self.interface = nn.Linear(C, heads * self.head_params + Hw * 2 * W)
        self.output = nn.Linear(C + R * W, output_size)
        if cfg.layer_init == "tensorflow":
            tensorflow_layer_init(self.controller, self.interface, self.output)
        if cfg.controller == "lstm":
            add_forget_bias(self.controller, cfg.forget_bias)

        # Learned initial reads and weightings (Collier & Beel): Glorot-uniform as for a 1 -> n layer, so the
        # initial weighting is near-uniform yet not exactly uniform, which lets content-free heads tell slots apart.
        self.init_reads = nn.Parameter(_glorot_vector((R, W), fan_out=W))  # r_0 = tanh(init_reads)
        self.init_weight_logits = nn.Parameter(_glorot_vector((heads, N), fan_out=N))  # w_0 = softmax over slots
        if cfg.memory_init == "learned":
            self.init_memory = nn.Parameter(_glorot_vector((N, W), fan_out=N * W))  # M_0 = tanh(init_memory)
        elif cfg.memory_init == "constant_trained":
            self.init_memory = nn.Parameter(torch.full((N, W), MEMORY_INIT_CONSTANT))  # M_0 = init_memory
        elif cfg.memory_init == "random_trained":
            self.init_memory = nn.Parameter(RANDOM_INIT_STD * torch.randn(N, W))  # M_0 = tanh(init_memory)

    # -- state -----------------------------------------------------------------------------------------------------

    def initial_state(self, batch_size: int, memory_size: int | None = None) -> NTMState:
        """The state before the first input, on the model's device and dtype.

        ``memory_size`` N' >= N runs the trained model with a larger memory: the extra rows follow the memory
        init scheme (random: random; every other scheme: 1e-6) and get zero initial weight, so the first
        N slots start exactly as in training.
        """
        cfg = self.cfg
        N = cfg.memory_size
        n = N if memory_size is None else memory_size
        if n < N:
            raise ConfigError("memory_size", f"an integer >= the trained memory_size {N} (learned initial weightings)",
                              n)
        ref = self.output.weight
        B, R, Hw, W = batch_size, cfg.read_heads, cfg.write_heads, cfg.word_size

        if cfg.memory_init == "constant":
            M = torch.full((n, W), MEMORY_INIT_CONSTANT, device=ref.device, dtype=ref.dtype).expand(B, n, W)
        elif cfg.memory_init in TRAINED_INITS:
            M = self.init_memory if cfg.memory_init == "constant_trained" else torch.tanh(self.init_memory)
            if n > N:
                M = torch.cat([M, M.new_full((n - N, W), MEMORY_INIT_CONSTANT)])
            M = M.expand(B, n, W)
        else:
            M = torch.tanh(RANDOM_INIT_STD * torch.randn(B, n, W, device=ref.device, dtype=ref.dtype))

        w0 = torch.softmax(self.init_weight_logits, dim=-1)  # [R + Hw, N]
        if n > N:
            w0 = F.pad(w0, (0, n - N))
        w0 = w0.expand(B, R + Hw, n)
        reads = torch.tanh(self.init_reads).expand(B, R, W)
        if cfg.controller == "lstm":
            controller = (ref.new_zeros(B, cfg.controller_size), ref.new_zeros(B, cfg.controller_size))
        else:
            controller = ()
        return NTMState(M, w0[:, :R], w0[:, R:], reads, controller)

    # -- one time step ---------------------------------------------------------------------------------------------

    def step(self, x: Tensor, state: NTMState) -> tuple[Tensor, NTMState]:
        """x: [B, I] -> (logits [B, O], next state)."""
        cfg = self.cfg
        B, R, Hw, W = x.shape[0], cfg.read_heads, cfg.write_heads, cfg.word_size
        S = 2 * cfg.shift_range + 1

        # 1. Controller, fed the input and the previous read vectors r_{t-1}.
        h, controller = self._controller(torch.cat([x, state.reads.flatten(1)], dim=1), state.controller)

        # 2. All heads' parameters from one layer; clipping keeps β, γ and the logits finite (Collier & Beel).
        params = self._clip(self.interface(h))
        head = params[:, : (R + Hw) * self.head_params].view(B, R + Hw, self.head_params)
        key = torch.tanh(head[..., :W])  # k_t: [B, H, W], in the range of the (tanh) memory contents
        beta = F.softplus(head[..., W])  # β_t >= 0
        gate = torch.sigmoid(head[..., W + 1])  # g_t in (0, 1)
        shift_weights = torch.softmax(head[..., W + 2 : W + 2 + S], dim=-1)  # s_t over shifts -k..k
        gamma = 1 + F.softplus(head[..., -1])  # γ_t >= 1
        erase_add = params[:, (R + Hw) * self.head_params :].view(B, Hw, 2 * W)
        erase = torch.sigmoid(erase_add[..., :W])  # e_t: [B, Hw, W]
        add = torch.tanh(erase_add[..., W:])  # a_t: [B, Hw, W], tanh keeps the memory bounded

        # 3. Addressing (Sec. 3.3) of all heads on M_{t-1}.
        w_prev = torch.cat([state.read_weights, state.write_weights], dim=1)
        w = addressing.content_weights(state.memory, key, beta)
        w = addressing.interpolate(w, w_prev, gate)
        w = addressing.shift(w, shift_weights)
        w = addressing.sharpen(w, gamma)
        read_w, write_w = w[:, :R], w[:, R:]

        # 4. Read from M_{t-1}, then write M_t.
        reads = memory.read(state.memory, read_w)
        M = memory.erase_and_add(state.memory, write_w, erase, add)

        # 5. Output from the controller and the current reads.
        y = self._clip(self.output(torch.cat([h, reads.flatten(1)], dim=1)))
        return y, NTMState(M, read_w, write_w, reads, controller)

    def forward(self, x: Tensor, state: NTMState | None = None, memory_size: int | None = None) -> Tensor:
        """x: [B, T, I] -> logits [B, T, O]. ``memory_size`` only applies when ``state`` is None."""
        if state is None:
            state = self.initial_state(x.shape[0], memory_size)
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1)

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _controller(self, inp: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        if self.cfg.controller == "lstm":
            h, c = self.controller(inp, state)
            return h, (h, c)
        return torch.tanh(self.controller(inp)), ()

    def _clip(self, t: Tensor) -> Tensor:
        v = self.cfg.clip_value
        return t if v is None else t.clamp(-v, v)


def tensorflow_layer_init(controller: nn.LSTMCell | nn.Linear, interface: nn.Linear, output: nn.Linear) -> None:
    """Collier & Beel's starting weights, in place: the interface and output layers (their ``o2p``, ``o2o``:
    ``tf.layers.dense`` with ``create_linear_initializer``) from a normal with std 1/sqrt(fan_in) truncated at two
    std; the LSTM controller's kernel (TensorFlow's BasicLSTMCell: one [in + H, 4H] matrix, the variable's default
    Glorot-uniform) uniform in ±sqrt(6 / (in + H + 4H)); a feedforward controller Glorot-uniform; every bias 0."""
    with torch.no_grad():
        for layer in (interface, output):
            std = 1.0 / math.sqrt(layer.in_features)
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            layer.bias.zero_()
        if isinstance(controller, nn.LSTMCell):
            fan_in, fan_out = controller.input_size + controller.hidden_size, 4 * controller.hidden_size
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            for weight in (controller.weight_ih, controller.weight_hh):
                weight.uniform_(-limit, limit)
            controller.bias_ih.zero_()
            controller.bias_hh.zero_()
        else:
            nn.init.xavier_uniform_(controller.weight)
            controller.bias.zero_()


def _glorot_vector(shape: tuple[int, ...], fan_out: int) -> Tensor:
    """Uniform(±sqrt(6 / (1 + fan_out))): Glorot's bound for a bias-free 1 -> fan_out layer (a learned vector)."""
    bound = math.sqrt(6.0 / (1 + fan_out))
    return torch.empty(shape).uniform_(-bound, bound)
