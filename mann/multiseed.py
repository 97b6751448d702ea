"""Many seeds of one configuration trained at once, each seed exactly as ``fit`` would train it alone.

A stability study trains one configuration under S seeds. ``fit_seeds(config, seeds)`` runs them as one
batched model: every step draws each seed's batch from its own data stream, stacks the S seeds' parameters
([S, ...] per parameter), runs one forward and one backward over all seeds, then hands each seed its own
slice of the gradient, which it clips and applies with its own optimizer. Each seed is a ``mann.train._Run``
(the object ``fit`` itself trains), so initial weights, data, curriculum, clipping, optimizer, divergence
checks, evaluation and checkpoints are fit's own code; only the forward/backward is shared.

How the seeds share one forward ("fold"): the seed axis is folded into the batch axis. Rows
``s*B .. (s+1)*B - 1`` of a [S*B, ...] batch belong to seed s; memory, addressing and state are per row anyway,
so only the parametric layers need seed s's weights for seed s's rows. An NTM or DNC whose run takes the fused CPU
path (mann.dispatch) runs it with the stacked weights, which it applies block by block in one bmm
(mann.fast_shared.linear). Any other model runs its own code on S*B rows, its ``nn.Linear``/``nn.LSTMCell``/
``nn.LSTM`` layers swapped for per-seed versions (``nn.LSTM``: one fused call per seed, faster here than a
step-by-step batched LSTM).
``torch.func.vmap`` over ``functional_call`` was the other candidate: it cannot batch ``nn.LSTMCell`` (no rule
for ``aten::lstm_cell``) and, with the cell rewritten, measured slower than the fold here (bench/seeds.py).
A model the fold cannot handle (parameters used outside those layers, randomness in ``step``, per-seed
buffers) fails a check at start-up: ``engine="auto"`` then trains the seeds one after the other (``"loop"``,
fit's step itself), with a warning.

What is exact: each seed's initial weights, data, curriculum levels, optimizer state, clipping (its own gradient
norm), divergence step, convergence stop, final evaluation and checkpoints are those of ``fit(replace(config,
seed=s))``. The arithmetic is the same up to floating-point reassociation (a batched matmul sums in another
order than a plain one), so the weights agree to rounding (about 1e-12 relative after tens of float64 steps),
not bit for bit. Sequences of one step have different lengths per seed; shorter ones are padded at the end with
zero input, and their logits there are never scored, so the padding adds exact zeros to the gradient (unless the
model overflows on the padding itself: 0 * inf is NaN, and that seed would be reported diverged). Evaluation
runs per seed with fit's own evaluation (exact). ``wall_time`` is the shared training time, not what the seed
would take alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mann import fast
from mann.config import ConfigError
from mann.optim import grad_norm
from mann.train import FitResult, TrainConfig, _Run

SEED_DIR = "seed-{seed}"  # each seed's checkpoints: <checkpoint_dir>/seed-<s>/checkpoint.pt, as fit writes them

OnSeedEval = Callable[[int, dict[str, float], Callable[[str | os.PathLike], Path]], bool | None]
Engine = Literal["auto", "fold", "loop"]


# ----------------------------------------------------------------------------------------------------------------------
# One seed: fit's _Run plus the bookkeeping fit keeps in local variables.


@dataclasses.dataclass
class _Seed:
    seed: int
    run: _Run
    rng: dict[str, Tensor]  # this seed's global RNG (models may draw from it, e.g. NTM's random initial memory)
    loss_sum: Tensor  # training losses since the last evaluation, summed on the device as fit does
    loss_count: int = 0
    evaluations: int = 0
    last_checkpoint: Path | None = None
    saved_at: int = -1
    clock_mark: float = 0.0  # the shared training clock at this seed's last evaluation
    result: FitResult | None = None  # set when the seed is done


@contextlib.contextmanager
def _seed_rng(seed: _Seed) -> Iterator[None]:
    """Run the body on this seed's global RNG stream; keep where it got to; restore the caller's."""
    outer = seed.run._rng_state()
    seed.run._set_rng_state(seed.rng)
    try:
        yield
    finally:
        seed.rng = seed.run._rng_state()
        seed.run._set_rng_state(outer)


def _seed_config(config: TrainConfig, seed: int) -> TrainConfig:
    """The config ``fit`` would get for this seed; checkpoints go to a directory of their own."""
    changes: dict[str, Any] = {"seed": seed}
    if config.checkpoint_dir is not None:
        changes["checkpoint_dir"] = str(Path(config.checkpoint_dir) / SEED_DIR.format(seed=seed))
    return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------------------------------------------------
# Layers that apply seed s's weights to seed s's rows. They read the stacked weights from a shared dict that the
# engine refills every step, so the folded model is built once.


class _Stacked:
    """Name -> stacked parameter [S, ...], refilled by the engine before each forward."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.seeds = 0

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]


def _per_seed(x: Tensor, seeds: int) -> Tensor:
    """[S*B, ..., n] -> [S, B*..., n]: seed-major rows, so each seed's rows are one block."""
    return x.reshape(seeds, -1, x.shape[-1])


def seed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = x W_s^T + b_s for the rows of seed s. x: [S*B, ..., in]; weight: [S, out, in]; bias: [S, out]."""
    S = weight.shape[0]
    xs = _per_seed(x, S)
    if bias is None:
        y = torch.bmm(xs, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias[:, None, :], xs, weight.transpose(1, 2))
    return y.view(*x.shape[:-1], weight.shape[1])


def seed_lstm_gates(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                    b_hh: Tensor | None) -> Tensor:
    """W_ih x + b_ih + W_hh h + b_hh per seed (the LSTM's four gate pre-activations). x: [S*B, in]; h: [S*B, H]."""
    return seed_linear(x, w_ih, b_ih) + seed_linear(h, w_hh, b_hh)


def lstm_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM cell update from its gate pre-activations [.., 4H] in PyTorch's order (i, f, g, o)."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class _SeedLinear(nn.Module):
    def __init__(self, stacked: _Stacked, prefix: str, has_bias: bool):
        super().__init__()
        self.stacked, self.prefix, self.has_bias = stacked, prefix, has_bias

    def forward(self, x: Tensor) -> Tensor:
        bias = self.stacked[self.prefix + "bias"] if self.has_bias else None
        return seed_linear(x, self.stacked[self.prefix + "weight"], bias)


class _SeedLSTMCell(nn.Module):
    def __init__(self, stacked: _Stacked, prefix: str, cell: nn.LSTMCell):
        super().__init__()
        self.stacked, self.prefix, self.has_bias, self.hidden_size = stacked, prefix, cell.bias, cell.hidden_size

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        p = self.prefix
        b_ih, b_hh = (self.stacked[p + "bias_ih"], self.stacked[p + "bias_hh"]) if self.has_bias else (None, None)
        gates = seed_lstm_gates(x, hx[0], self.stacked[p + "weight_ih"], self.stacked[p + "weight_hh"], b_ih, b_hh)
        return lstm_update(gates, hx[1])


class _SeedLSTM(nn.Module):
    """nn.LSTM, each seed's rows through its own weights: one fused LSTM call per seed.

    A fused nn.LSTM call is far faster than an LSTM written step by step in batched matmuls (measured here: 8
    seeds, 41 steps, 8 ms alone per seed vs 148 ms folded step by step), so the seeds take turns here; the
    layers around it still run folded.
    """

    def __init__(self, stacked: _Stacked, prefix: str, lstm: nn.LSTM):
        super().__init__()
        self.stacked, self.prefix, self.lstm = stacked, prefix, lstm
        self.names = [name for name, _ in lstm.named_parameters()]

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        S = self.stacked.seeds
        batch_axis = 0 if self.lstm.batch_first else 1
        xs = x.chunk(S, dim=batch_axis)  # seed-major rows: chunk i is seed i's
        hxs = [None] * S if hx is None else list(zip(hx[0].chunk(S, dim=1), hx[1].chunk(S, dim=1), strict=True))
        ys, hs, cs = [], [], []
        for i in range(S):
            weights = {name: self.stacked[self.prefix + name][i] for name in self.names}
            y, (h, c) = functional_call(self.lstm, weights, (xs[i], hxs[i]))
            ys.append(y)
            hs.append(h)
            cs.append(c)
        return torch.cat(ys, dim=batch_axis), (torch.cat(hs, dim=1), torch.cat(cs, dim=1))


class NotFoldable(Exception):
    """The model cannot run its seeds folded into the batch (one line: why)."""


def fold_model(model: nn.Module, stacked: _Stacked, prefix: str = "") -> nn.Module:
    """A copy of ``model`` whose Linear/LSTMCell/LSTM layers take per-seed weights from ``stacked``.

    Everything else is shared with ``model`` (config, constants, code). Parameters held directly by a module
    (e.g. NTM's learned initial reads, used by ``initial_state`` only) are set to None in the copy, so a
    ``step`` that used them fails the start-up check instead of silently using one seed's values.
    """
    if type(model) is nn.Linear:
        return _SeedLinear(stacked, prefix, model.bias is not None)
    if type(model) is nn.LSTMCell:
        return _SeedLSTMCell(stacked, prefix, model)
    if type(model) is nn.LSTM:
        if model.bidirectional or model.proj_size or model.dropout:
            raise NotFoldable(f"{prefix or 'model'}: an nn.LSTM with bidirectional/proj_size/dropout")
        return _SeedLSTM(stacked, prefix, model)
    if not any(True for _ in model.parameters()):
        return model  # nothing per seed below here
    folded = copy.copy(model)
    folded._parameters = {}
    for name in model._parameters:
        folded.__dict__[name] = None
    folded._modules = {
        name: None if child is None else fold_model(child, stacked, f"{prefix}{name}.")
        for name, child in model._modules.items()
    }
    return folded


# ----------------------------------------------------------------------------------------------------------------------
# Recurrent states: NamedTuples/tuples of tensors, each with one batch axis.


def _map_state(fn: Callable[..., Any], *states: Any) -> Any:
    """Apply ``fn`` leaf by leaf (tensors, or ints such as batch axes) to states of one structure."""
    first = states[0]
    if isinstance(first, Tensor | int):
        return fn(*states)
    if isinstance(first, tuple):
        items = [_map_state(fn, *parts) for parts in zip(*states, strict=True)]
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    raise NotFoldable(f"a recurrent state holding a {type(first).__name__} (expected tensors in tuples)")


def _batch_axes(model: nn.Module) -> Any:
    """For each state tensor, its batch axis: the one whose size goes 1 -> 2 from initial_state(1) to (2)."""
    def axis(a: Tensor, b: Tensor) -> int:
        changed = [i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)) if m != n]
        if len(changed) != 1 or (a.shape[changed[0]], b.shape[changed[0]]) != (1, 2):
            raise NotFoldable("a recurrent state tensor without exactly one batch axis")
        return changed[0]

    with torch.random.fork_rng(devices=[]), torch.no_grad():  # draws from nobody's stream
        one, two = model.initial_state(1), model.initial_state(2)
    return _map_state(axis, one, two)


class _Method(nn.Module):
    """Calls one method of a model, so functional_call can run it (functional_call only calls forward)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method)(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Engines: the forward/backward of one step for the active seeds. Each returns (loss, gradient norm) per seed,
# with the gradients on the seed's own parameters, just as _Run.train_step leaves them.


class _LoopEngine:
    """One seed after the other, each with fit's own step: the reference, and the fallback."""

    name = "loop"

    def train_step(self, seeds: list[_Seed]) -> list[tuple[Tensor, Tensor]]:
        out = []
        for s in seeds:
            with _seed_rng(s):
                out.append(s.run.train_step())
        return out


class _FoldEngine:
    """All active seeds in one forward and one backward, the seed axis folded into the batch axis."""

    name = "fold"

    def __init__(self, seeds: list[_Seed]):
        base = seeds[0].run.model
        self.names = [name for name, p in base.named_parameters() if p.requires_grad]
        if not self.names:
            raise NotFoldable("the model has no trainable parameters")
        buffers = [dict(s.run.model.named_buffers()) for s in seeds]
        for name, value in buffers[0].items():
            if not all(torch.equal(value, b[name]) for b in buffers[1:]):
                raise NotFoldable(f"buffer {name} differs between seeds")
        self.stacked = _Stacked()
        self.base, self.fast_names = base, _fast_names(base, self.names, seeds[0].run.path)
        # the layer-swapped copy only where the fast path does not run the seeds
        self.folded = fold_model(base, self.stacked) if self.fast_names is None else None
        self.axes = _batch_axes(base)
        self.initial = {id(s): _Method(s.run.model, "initial_state") for s in seeds}
        self._check(seeds)

    def _stack(self, seeds: list[_Seed]) -> dict[str, Tensor]:
        """Fresh leaves [S, ...] holding the seeds' current weights (their optimizers update their own copies)."""
        params = [dict(s.run.model.named_parameters()) for s in seeds]
        self.stacked.tensors = {n: torch.stack([p[n].detach() for p in params]).requires_grad_() for n in self.names}
        self.stacked.seeds = len(seeds)
        return self.stacked.tensors

    def _initial_states(self, seeds: list[_Seed], batch_size: int) -> Any:
        """Each seed's initial state (on its own RNG stream, differentiable in the stacked weights), folded."""
        states = []
        for i, s in enumerate(seeds):
            weights = {f"model.{n}": t[i] for n, t in self.stacked.tensors.items()}
            with _seed_rng(s):
                states.append(functional_call(self.initial[id(s)], weights, (batch_size,), strict=False))
        return _map_state(lambda axis, *parts: torch.cat(parts, dim=axis), self.axes, *states)

    def _forward(self, inputs: list[Tensor], state: Any) -> Tensor:
        """inputs: S tensors [B, T_s, I] -> logits [S, B, T, O], T = max T_s (shorter ones zero-padded at the end)."""
        T = max(x.shape[1] for x in inputs)
        x = torch.cat([F.pad(x, (0, 0, 0, T - x.shape[1])) for x in inputs])
        if self.fast_names is not None:
            params = [self.stacked.tensors[name] for name in self.fast_names]
            logits = fast.forward(self.base, x, state=state, params=params)
        else:
            logits = self.folded(x, state=state)
        return logits.view(len(inputs), inputs[0].shape[0], *logits.shape[1:])

    @torch.no_grad()
    def _check(self, seeds: list[_Seed]) -> None:
        """The folded forward must give each seed what its own model gives, on a short random sequence."""
        run = seeds[0].run
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(2, 3, run.task.input_size, generator=g).to(run.device, run.dtype) for _ in seeds]
        tol = 1e-4 if run.dtype == torch.float32 else 1e-9
        streams = [s.rng for s in seeds]  # the check must not move the seeds' RNG streams
        try:
            self._stack(seeds)
            state = self._initial_states(seeds, 2)
            try:
                folded = self._forward(inputs, state)
            except Exception as err:  # any failure of the folded step means: not foldable
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise NotFoldable(f"the folded step failed ({type(err).__name__}: {detail})") from None
            for i, (s, x) in enumerate(zip(seeds, inputs, strict=True)):
                own = _map_state(lambda axis, t, i=i: t.narrow(axis, 2 * i, 2), self.axes, state)
                if not torch.allclose(folded[i], s.run.model(x, state=own), rtol=tol, atol=tol):
                    raise NotFoldable("the folded step differs from the model's own (does step use parameters "
                                      "outside Linear/LSTMCell/LSTM layers, or randomness?)")
        finally:
            for s, stream in zip(seeds, streams, strict=True):
                s.rng = stream
            self.stacked.tensors = {}

    def train_step(self, seeds: list[_Seed]) -> list[tuple[Tensor, Tensor]]:
        stacked = self._stack(seeds)
        batches = [s.run._to_device(s.run.task.sample(s.run.cfg.batch_size, s.run.generator)) for s in seeds]
        state = self._initial_states(seeds, batches[0].inputs.shape[0])
        logits = self._forward([b.inputs for b in batches], state)
        losses = [s.run.task.loss(logits[i, :, : b.inputs.shape[1]], b)
                  for i, (s, b) in enumerate(zip(seeds, batches, strict=True))]
        torch.stack(losses).sum().backward()  # seeds share no weights: each slice gets its own seed's gradient
        out = []
        for i, s in enumerate(seeds):
            params = dict(s.run.model.named_parameters())
            for name in self.names:
                grad = stacked[name].grad
                params[name].grad = None if grad is None else grad[i]
            s.run.flat.gather_grads()  # into the seed's flat gradient, where its own step would have left them
            out.append((losses[i].detach(), grad_norm(s.run.flat)))
        self.stacked.tensors = {}
        return out


def _fast_names(model: nn.Module, trainable: list[str], path: str) -> tuple[str, ...] | None:
    """The parameters to hand the model's fused path (mann.fast), stacked per seed, if the runs take that ``path``
    and every weight it takes is trained; else None (the folded model's layers run instead)."""
    if path != "fused":
        return None
    names = fast.param_names(model)
    return names if set(names) <= set(trainable) else None


def _make_engine(engine: Engine, seeds: list[_Seed]) -> _FoldEngine | _LoopEngine:
    if engine == "loop" or (engine == "auto" and len(seeds) == 1):  # one seed: fit's own step is the fastest
        return _LoopEngine()
    try:
        return _FoldEngine(seeds)
    except NotFoldable as err:
        if engine == "fold":
            raise NotFoldable(f"fit_seeds: model {seeds[0].run.cfg.model!r} cannot be folded: {err}") from None
        warnings.warn(f"fit_seeds: training the seeds one after the other: {err}", stacklevel=3)
        return _LoopEngine()


# ----------------------------------------------------------------------------------------------------------------------


def _start(config: TrainConfig, seeds: list[int], resume_from: str | os.PathLike | None = None,
           impl: str | None = None) -> list[_Seed]:
    """One _Run per seed, built as fit builds it (torch.manual_seed(seed), then the model), optionally resumed."""
    states = []
    for seed in seeds:
        run = _Run(_seed_config(config, seed), impl)
        state = _Seed(seed, run, run._rng_state(), torch.zeros((), device=run.device, dtype=torch.float64))
        if resume_from is not None:
            with _seed_rng(state):  # the checkpoint's RNG stream becomes this seed's
                run.load(Path(resume_from) / SEED_DIR.format(seed=seed))
        states.append(state)
    return states


def fit_seeds(
    config: TrainConfig,
    seeds: Sequence[int],
    on_eval: OnSeedEval | None = None,
    resume_from: str | os.PathLike | None = None,
    engine: Engine = "auto",
    impl: str | None = None,
) -> list[FitResult]:
    """Train ``config`` under each of ``seeds`` at once; result i is what ``fit(replace(config, seed=seeds[i]))`` gives.

    ``config.seed`` is ignored. ``on_eval(seed, metrics, save_checkpoint)`` is called for each seed after each
    of its evaluations (seeds in the order given), exactly when and with what fit would call its on_eval;
    returning True stops that seed only. With ``config.checkpoint_dir`` set, seed s writes fit's checkpoints to
    ``<checkpoint_dir>/seed-<s>/``; ``resume_from`` is such a directory (each seed resumes from its
    ``seed-<s>`` checkpoint, which ``fit`` can also resume from, and vice versa). A seed that diverges or stops
    leaves the batch; the others go on. ``engine``: "fold" (one batched model), "loop" (one seed after the
    other), "auto" (fold when the model passes the fold check, else loop with a warning; loop for one seed).
    ``impl``: as fit's (mann.dispatch).
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ConfigError("seeds", "a non-empty list of distinct integers", seeds)
    if engine not in ("auto", "fold", "loop"):
        raise ConfigError("engine", "one of 'auto', 'fold', 'loop'", engine)

    states = _start(config, seeds, resume_from, impl)
    cfg = config
    clock = 0.0  # training time shared by all seeds (evaluation and checkpointing excluded, as in fit)

    def save(s: _Seed, directory: str | os.PathLike) -> Path:
        with _seed_rng(s):  # the checkpoint records this seed's RNG stream, as fit's would
            return s.run.save(directory)

    def evaluate_and_report(s: _Seed) -> bool:
        """fit's evaluate_and_report for one seed. True if on_eval asks this seed to stop."""
        run = s.run
        run.wall_time += clock - s.clock_mark
        s.clock_mark = clock
        train_loss = (s.loss_sum / max(s.loss_count, 1)).item() if s.loss_count else math.nan
        s.loss_sum.zero_()
        s.loss_count = 0
        metrics = run.evaluate_and_advance(train_loss)
        s.evaluations += 1
        if cfg.checkpoint_dir is not None and s.evaluations % cfg.checkpoint_every == 0:
            s.last_checkpoint, s.saved_at = save(s, run.cfg.checkpoint_dir), run.step
        if on_eval is None:
            return False
        return bool(on_eval(s.seed, metrics, lambda directory: save(s, directory)))

    def finish(s: _Seed, status: str) -> None:
        run = s.run
        if cfg.checkpoint_dir is not None and (s.last_checkpoint is None or s.saved_at != run.step):
            s.last_checkpoint = save(s, run.cfg.checkpoint_dir)
        s.result = run.result(status, s.last_checkpoint)

    def done(run: _Run) -> bool:
        return run.step >= cfg.max_steps or run.converged_step is not None

    active = [s for s in states if not done(s.run)]
    for s in states:
        if done(s.run):  # resumed at the end: fit's loop would not run either
            finish(s, "completed")
    engine_impl = _make_engine(engine, active) if active else _LoopEngine()
    while active:
        started = time.perf_counter()
        outcomes = engine_impl.train_step(active)
        # One host sync for all seeds: NaN/Inf in a seed's loss or gradient ends that seed before its update.
        finite = torch.isfinite(torch.stack([(loss + norm).to(torch.float64) for loss, norm in outcomes])).tolist()
        overflows = [s.run.apply_update(norm) if ok else None
                     for s, (_, norm), ok in zip(active, outcomes, finite, strict=True)]
        clock += time.perf_counter() - started
        for s, (loss, norm), ok, overflow in zip(active, outcomes, finite, overflows, strict=True):
            run = s.run
            run.step += 1
            if overflow is not None or not ok:
                run.wall_time += clock - s.clock_mark
                message = f"diverged at step {run.step}: {run.divergence(loss, norm, overflow)}"
                s.result = run.result("diverged", s.last_checkpoint, message)
                continue
            s.loss_sum += loss
            s.loss_count += 1
            if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
                if evaluate_and_report(s) and not done(run):
                    finish(s, "stopped")
                elif done(run):
                    finish(s, "completed")
        active = [s for s in active if s.result is None]
    return [s.result for s in states]
