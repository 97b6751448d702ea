"""Algorithmic tasks: seeded generators, masks, losses, metrics and a curriculum.

Every task turns a ``torch.Generator`` into a :class:`Batch` of CPU tensors::

    inputs  [B, T, I] float32
    targets [B, T, O] float32 bits (bit tasks) | [B, T] int64 class ids (class tasks; 0 where unscored)
    mask    [B, T]    float32, 1 where the output is scored

Sequences of one batch have different lengths; each is padded at the end to the batch's ``T``
with zero inputs and mask 0.

Bit tasks (Graves et al. 2014, §4): ``copy``, ``repeat_copy``, ``associative_recall``, ``reverse``,
``priority_sort``. Class tasks: ``graph`` (DNC paper, Graves et al. 2016: traversal and shortest
path on random graphs) and ``babi_two_facts`` (generated stories in the style of bAbI task 2).

Difficulty. Each task has one integer difficulty that caps its size bounds (sequence length,
repeats, items, inputs, nodes, facts). With the curriculum on it starts at ``curriculum_start``
and grows by ``curriculum_step`` each time :meth:`Task.update_curriculum` sees an error below
``curriculum_threshold``; with it off it is the config's maximum from the start.

Evaluation at full difficulty. ``sample(..., full=True)`` ignores the curriculum and draws from
the config's whole training range (what the run is asked to learn); ``mann.train`` reports its
``error`` there, and the curriculum's ``curriculum_error`` at the current difficulty.

Generalization. ``sample(..., scale=s)`` with ``s > 1`` ignores the curriculum and draws every
ranged size from beyond the training range, ``[max + 1, ceil(s * max)]`` (fixed sizes become
``round(s * size)``), so ``gen2x_error`` measures instances up to twice as big as any trained on.

Metrics (:meth:`Task.score`, :class:`Score`): ``error`` (bit tasks: wrong bits per sequence when
thresholded at probability 0.5; class tasks: the fraction of wrong answers), ``cost_bits`` (Graves's
cost: the cross-entropy of a sequence's scored outputs summed, in bits, per sequence) and
``accuracy`` (the fraction of sequences entirely right). Units: :data:`METRIC_UNITS`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F

from mann.config import ConfigError, check, replace_checked


class Batch(NamedTuple):
    inputs: torch.Tensor  # [B, T, I] float32
    targets: torch.Tensor  # [B, T, O] float32 bits | [B, T] int64 class ids
    mask: torch.Tensor  # [B, T] float32, 1 where scored

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(x.to(device) for x in self))


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    """Fields every task has: curriculum and success threshold. Tasks override the defaults."""

    curriculum: bool = True  # off: difficulty is the maximum from the first step
    curriculum_start: int = 2  # first difficulty (raised to the task's minimum if below it)
    curriculum_step: int = 1  # difficulty added per promotion
    curriculum_threshold: float = 0.1  # promote when metrics()["error"] < this at the current difficulty
    target_error: float = 0.1  # success: metrics()["error"] <= this (bits per sequence / wrong answers)
    # the training loss over a batch: "mean" per scored element (bit or answer step); "sum" over the scored
    # elements divided by the batch size, as Collier & Beel's and Csordás & Schmidhuber's scripts do (the gradient's
    # scale, and so what a gradient-norm clip or weight decay does, follows the reduction)
    loss_reduction: Literal["mean", "sum"] = "mean"

    def __post_init__(self):
        check(self.loss_reduction in ("mean", "sum"), "loss_reduction", "'mean' or 'sum'", self.loss_reduction)
        check(self.curriculum_start >= 1, "curriculum_start", "a positive integer", self.curriculum_start)
        check(self.curriculum_step >= 1, "curriculum_step", "a positive integer", self.curriculum_step)
        check(
            0 < self.curriculum_threshold < math.inf,
            "curriculum_threshold", "a positive number", self.curriculum_threshold,
        )
        check(0 < self.target_error < math.inf, "target_error", "a positive number", self.target_error)


def _check_range(lo: int, hi: int, lo_key: str, hi_key: str, minimum: int = 1) -> None:
    check(lo >= minimum, lo_key, f"an integer >= {minimum}", lo)
    check(hi >= lo, hi_key, f"an integer >= task.{lo_key} ({lo})", hi)


@dataclass(frozen=True)
class CopyConfig(TaskConfig):
    """Copy (Graves 2014, §4.1); difficulty = the longest sequence length."""

    bits: int = 8  # width of each random binary vector
    min_length: int = 1
    max_length: int = 20  # Graves trained on 1..20 and tested up to 120
    curriculum_start: int = 2
    curriculum_step: int = 2

    def __post_init__(self):
        super().__post_init__()
        check(self.bits >= 1, "bits", "a positive integer", self.bits)
        _check_range(self.min_length, self.max_length, "min_length", "max_length")


@dataclass(frozen=True)
class ReverseConfig(CopyConfig):
    """Reverse: the copy task's fields; the answer is the sequence backwards."""


@dataclass(frozen=True)
class RepeatCopyConfig(TaskConfig):
    """Repeat copy (Graves 2014, §4.2); difficulty caps both the length and the number of repeats."""

    bits: int = 8
    min_length: int = 1
    max_length: int = 10  # Graves: length and repeats both in 1..10
    min_repeats: int = 1
    max_repeats: int = 10
    curriculum_start: int = 2
    curriculum_step: int = 1

    def __post_init__(self):
        super().__post_init__()
        check(self.bits >= 1, "bits", "a positive integer", self.bits)
        _check_range(self.min_length, self.max_length, "min_length", "max_length")
        _check_range(self.min_repeats, self.max_repeats, "min_repeats", "max_repeats")


@dataclass(frozen=True)
class AssociativeRecallConfig(TaskConfig):
    """Associative recall (Graves 2014, §4.3); difficulty = the most items in a sequence."""

    bits: int = 6  # Graves: items of three 6-bit vectors, 2..6 items
    item_length: int = 3  # vectors per item
    min_items: int = 2  # at least 2: the query must have a successor
    max_items: int = 6
    curriculum_start: int = 2
    curriculum_step: int = 1

    def __post_init__(self):
        super().__post_init__()
        check(self.bits >= 1, "bits", "a positive integer", self.bits)
        check(self.item_length >= 1, "item_length", "a positive integer", self.item_length)
        _check_range(self.min_items, self.max_items, "min_items", "max_items", minimum=2)
        # items are distinct so that the answer is unique
        check(
            2 ** (self.bits * self.item_length) >= self.max_items,
            "max_items", f"at most 2**(bits*item_length) = {2 ** (self.bits * self.item_length)} distinct items",
            self.max_items,
        )


@dataclass(frozen=True)
class PrioritySortConfig(TaskConfig):
    """Priority sort (Graves 2014, §4.5); difficulty = number of inputs (outputs keep the same ratio)."""

    bits: int = 8
    num_inputs: int = 20  # Graves: 20 vectors in, the 16 of highest priority out
    num_outputs: int = 16
    curriculum_start: int = 4
    curriculum_step: int = 2
    curriculum_threshold: float = 1.0
    target_error: float = 1.0  # bits per sequence; Graves's NTM did not reach 0 on this task

    def __post_init__(self):
        super().__post_init__()
        check(self.bits >= 1, "bits", "a positive integer", self.bits)
        check(self.num_inputs >= 1, "num_inputs", "a positive integer", self.num_inputs)
        check(
            1 <= self.num_outputs <= self.num_inputs,
            "num_outputs", f"an integer in [1, task.num_inputs ({self.num_inputs})]", self.num_outputs,
        )


@dataclass(frozen=True)
class GraphConfig(TaskConfig):
    """Random-graph questions (DNC paper, 2016); difficulty = number of nodes.

    Node names are ids drawn at random from ``num_ids`` for each graph (as the DNC paper's random
    node labels), so a bigger graph at ``scale`` s needs ``num_ids >= ceil(s * max_nodes)``.
    """

    mode: Literal["traversal", "shortest_path"] = "traversal"
    min_nodes: int = 3
    max_nodes: int = 10
    num_ids: int = 40  # one-hot width of a node name; 40 lets scale 4 run with max_nodes 10
    num_labels: int = 4  # edge labels; a node's out-edges have distinct labels
    max_out_degree: int = 3  # each node has 1..this out-edges to distinct other nodes
    min_path: int = 1  # traversal: labels in the query; shortest_path: edges on the answer path
    max_path: int = 4
    planning_steps: int = 0  # blank steps between query and answer (the DNC paper gave 10 for shortest path)
    curriculum_start: int = 3
    curriculum_step: int = 1
    curriculum_threshold: float = 0.05
    target_error: float = 0.05  # fraction of wrong answers (an answer is the whole node sequence)

    def __post_init__(self):
        super().__post_init__()
        _check_range(self.min_nodes, self.max_nodes, "min_nodes", "max_nodes", minimum=2)
        check(
            self.num_ids >= self.max_nodes,
            "num_ids", f"an integer >= task.max_nodes ({self.max_nodes})", self.num_ids,
        )
        check(self.num_labels >= 1, "num_labels", "a positive integer", self.num_labels)
        check(
            1 <= self.max_out_degree <= self.num_labels,
            "max_out_degree", f"an integer in [1, task.num_labels ({self.num_labels})]", self.max_out_degree,
        )
        _check_range(self.min_path, self.max_path, "min_path", "max_path")
        if self.mode == "shortest_path":
            # a shortest path visits distinct nodes: it has at most n - 1 edges
            check(
                self.min_path < self.min_nodes,
                "min_path", f"an integer < task.min_nodes ({self.min_nodes}) for shortest_path", self.min_path,
            )
        check(self.planning_steps >= 0, "planning_steps", "a non-negative integer", self.planning_steps)


@dataclass(frozen=True)
class BabiTwoFactsConfig(TaskConfig):
    """Generated stories in the style of bAbI task 2 ("two supporting facts"); difficulty = facts per story."""

    min_facts: int = 2  # a fact is one sentence: someone moves, picks up or drops something
    max_facts: int = 20
    question_every: int = 3  # a question after every this many facts (when one is answerable) and at the end
    curriculum_start: int = 4
    curriculum_step: int = 2
    curriculum_threshold: float = 0.05
    target_error: float = 0.05  # fraction of wrong answers; bAbI's pass mark is 5% error

    def __post_init__(self):
        super().__post_init__()
        # two facts at least: someone must go somewhere and pick something up before a question
        _check_range(self.min_facts, self.max_facts, "min_facts", "max_facts", minimum=2)
        check(self.question_every >= 1, "question_every", "a positive integer", self.question_every)


# ---------------------------------------------------------------------------------------------
# The task protocol: curriculum, loss and metrics shared by all tasks
# ---------------------------------------------------------------------------------------------


class Task:
    """Base of every task. Subclasses set ``targets_kind``, sizes and :meth:`sample`."""

    targets_kind: ClassVar[Literal["bits", "classes"]]
    input_size: int
    output_size: int

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.level = 0  # curriculum promotions so far

    # --- difficulty and curriculum ---------------------------------------------------------

    def difficulty_limits(self) -> tuple[int, int]:
        """(lowest, highest) difficulty of this config."""
        raise NotImplementedError

    @property
    def target_error(self) -> float:
        return self.cfg.target_error

    @property
    def difficulty(self) -> int:
        lo, hi = self.difficulty_limits()
        if not self.cfg.curriculum:
            return hi
        return min(max(self.cfg.curriculum_start, lo) + self.level * self.cfg.curriculum_step, hi)

    def update_curriculum(self, error: float) -> bool:
        """Promote one level if ``error`` (at the current difficulty) is below the threshold; True if promoted."""
        if not self.cfg.curriculum or self.difficulty >= self.difficulty_limits()[1]:
            return False
        if not error < self.cfg.curriculum_threshold:  # NaN never promotes
            return False
        self.level += 1
        return True

    def state_dict(self) -> dict[str, int]:
        return {"level": int(self.level)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        level = state.get("level")
        if set(state) != {"level"} or isinstance(level, bool) or not isinstance(level, int) or level < 0:
            raise ValueError(f"task state: expected {{'level': non-negative int}}, got {dict(state)!r}")
        self.level = level

    def size_range(self, lo: int, hi: int, scale: float, difficulty: int) -> tuple[int, int]:
        """Inclusive range to draw a size from: capped at ``difficulty`` at scale 1, beyond ``hi`` at scale > 1."""
        if scale == 1:
            return lo, max(lo, min(hi, difficulty))
        top = _scaled(hi, scale)
        return min(hi + 1, top), top

    # --- sampling --------------------------------------------------------------------------

    def sample(self, batch_size: int, generator: torch.Generator, scale: float = 1.0, full: bool = False) -> Batch:
        """A batch of ``batch_size`` episodes; the same generator state gives the same batch.

        At scale 1 the sizes are capped by the curriculum's current difficulty, or with ``full`` by the
        config's maximum (the full training difficulty, whatever the curriculum's level).
        """
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if not (isinstance(scale, int | float) and 1 <= scale < math.inf):
            raise ValueError(f"scale: expected a number >= 1, got {scale!r}")
        difficulty = self.difficulty_limits()[1] if full else self.difficulty
        return self._sample(batch_size, generator, float(scale), difficulty)

    def _sample(self, batch_size: int, generator: torch.Generator, scale: float, difficulty: int) -> Batch:
        raise NotImplementedError

    # --- loss and metrics ------------------------------------------------------------------

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Masked BCE-with-logits (bits) or cross-entropy (classes), averaged per scored element, or with
        ``loss_reduction: sum`` summed over the scored elements and divided by the batch size.

        logits: [B, T, O]. A scored element is one bit of a scored step (bits) or one scored step (classes).
        """
        mask = batch.mask.to(device=logits.device, dtype=logits.dtype)
        per_sequence = self.cfg.loss_reduction == "sum"
        if self.targets_kind == "bits":
            targets = batch.targets.to(device=logits.device, dtype=logits.dtype)
            per_bit = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            count = logits.shape[0] if per_sequence else (mask.sum() * logits.shape[-1]).clamp(min=1)
            return (per_bit * mask[..., None]).sum() / count
        targets = batch.targets.to(logits.device)
        per_step = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(mask)
        return (per_step * mask).sum() / (logits.shape[0] if per_sequence else mask.sum().clamp(min=1))

    @torch.no_grad()
    def score(self, logits: torch.Tensor, batch: Batch) -> Score:
        """The sums behind the metrics of ``logits`` [B, T, O] on ``batch`` (add them up over batches).

        Bit tasks: ``wrong`` counts the scored bits that are wrong when thresholded at probability 0.5,
        per sequence (``counted`` = sequences), so ``error`` is Graves's wrong bits per sequence; the cost
        is the binary cross-entropy of every scored bit. Class tasks: ``wrong`` counts the wrong *answers*,
        an answer being a maximal run of consecutive scored steps (a graph query's whole node sequence, or
        one bAbI question's word), wrong if any of its steps is (``counted`` = answers); the cost is the
        cross-entropy of every scored step. Both: the cost is summed in bits (nats / ln 2) over each
        sequence and over the batch; ``right`` counts sequences with every scored step right.
        """
        scored = batch.mask.to(logits.device) > 0
        logits64 = logits.double()  # the cost in float64: a sum of many small terms
        B = float(logits.shape[0])
        if self.targets_kind == "bits":
            targets = batch.targets.to(logits.device) > 0.5
            wrong = ((logits > 0) != targets) & scored[..., None]  # sigmoid(x) > 0.5  <=>  x > 0
            per_sequence = wrong.sum(dim=(1, 2))
            bce = F.binary_cross_entropy_with_logits(logits64, targets.double(), reduction="none")
            cost = (bce * scored[..., None]).sum().item() / math.log(2)
            return Score(B, float(per_sequence.sum()), B, cost, float((per_sequence == 0).sum()))
        targets = batch.targets.to(logits.device)
        wrong = (logits.argmax(-1) != targets) & scored  # [B, T]
        ce = F.cross_entropy(logits64.flatten(0, 1), targets.flatten(), reduction="none").view_as(wrong)
        cost = (ce * scored).sum().item() / math.log(2)
        wrong_answers, answers = _answers(wrong, scored)
        return Score(B, float(wrong_answers), float(answers), cost, float((~wrong.any(dim=1)).sum()))

    def metrics(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """{"error", "cost_bits", "accuracy"} of ``logits`` [B, T, O] on ``batch`` (see :meth:`score`)."""
        return self.score(logits, batch).metrics()


class Score(NamedTuple):
    """Sums over a set of evaluated sequences; :meth:`metrics` turns them into the reported means."""

    sequences: float = 0.0
    wrong: float = 0.0  # wrong bits (bit tasks) or wrong answers (class tasks)
    counted: float = 0.0  # what ``wrong`` is a fraction of: sequences (bit tasks) or answers (class tasks)
    cost_bits: float = 0.0  # cross-entropy of the scored outputs, bits, summed over the sequences
    right: float = 0.0  # sequences with every scored output right

    def plus(self, other: Score) -> Score:
        return Score(*(a + b for a, b in zip(self, other, strict=True)))

    def metrics(self) -> dict[str, float]:
        """error = wrong / counted; cost_bits and accuracy per sequence (NaN where nothing was counted)."""
        def ratio(a: float, b: float) -> float:
            return a / b if b else math.nan

        return {"error": ratio(self.wrong, self.counted), "cost_bits": ratio(self.cost_bits, self.sequences),
                "accuracy": ratio(self.right, self.sequences)}


# The unit of every metric mann.train reports; a generalization metric gen<s>x_<name> and a final
# evaluation's final_<name> / final_gen<s>x_<name> have <name>'s unit.
METRIC_UNITS: dict[str, str] = {
    "error": "wrong bits per sequence (bit tasks) | fraction of answers wrong (class tasks)",
    "curriculum_error": "as error, at the curriculum's current difficulty",
    "cost_bits": "bits per sequence (cross-entropy of the scored outputs, log base 2)",
    "accuracy": "fraction of sequences entirely right",
    "train_loss": "nats per scored bit (bit tasks) | nats per scored step (class tasks)",
    "level": "curriculum promotions",
    "step": "optimizer updates",
    "sequences": "training sequences seen",
    "wall_time": "seconds of training (evaluation excluded)",
    "converged_step": "optimizer updates",
}


def metric_unit(name: str) -> str:
    """The unit of a reported metric name (``gen2x_error``, ``final_cost_bits`` ...), or "" if unknown."""
    base = name.removeprefix("final_")
    if base.startswith("gen") and "x_" in base:
        base = base.split("x_", 1)[1]
    return METRIC_UNITS.get(base, "")


def _answers(wrong: torch.Tensor, scored: torch.Tensor) -> tuple[int, int]:
    """(wrong answers, answers): answers are maximal runs of scored steps, per sequence. [B, T] bools."""
    previous = F.pad(scored[:, :-1], (1, 0), value=False)
    starts = scored & ~previous
    run = starts.long().cumsum(dim=1)  # answer number within the sequence, at scored steps
    answer_id = torch.arange(scored.shape[0], device=scored.device)[:, None] * (scored.shape[1] + 1) + run
    return torch.unique(answer_id[wrong]).numel(), int(starts.sum())


def _scaled(size: int, scale: float) -> int:
    # round first: 2.0000000001 * 20 must not become 41
    return max(size, math.ceil(round(scale * size, 6)))


def _rng(generator: torch.Generator) -> random.Random:
    """A Python RNG seeded from ``generator``: per-episode generation of graphs and stories is scalar work."""
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))


def _randint(lo: torch.Tensor | int, hi: torch.Tensor | int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Integers uniform in [lo, hi] (inclusive, per element when tensors): [size] int64."""
    u = torch.rand(size, generator=generator, dtype=torch.float64)
    lo_t, hi_t = torch.as_tensor(lo), torch.as_tensor(hi)
    return (lo_t + (u * (hi_t - lo_t + 1)).floor().long()).clamp(max=hi_t)


# ---------------------------------------------------------------------------------------------
# Bit tasks (Graves et al. 2014, §4)
# ---------------------------------------------------------------------------------------------


class CopyTask(Task):
    """Copy (Graves 2014, §4.1): a sequence of random bit vectors, a delimiter, then the sequence again.

    Channels: inputs ``[bits | delimiter]``, outputs ``[bits]``. For length L the episode has 2L + 1
    steps: L input vectors, the delimiter, L scored answer steps with zero input.
    """

    targets_kind = "bits"

    def __init__(self, cfg: CopyConfig):
        super().__init__(cfg)
        self.input_size = cfg.bits + 1
        self.output_size = cfg.bits

    def difficulty_limits(self) -> tuple[int, int]:
        return self.cfg.min_length, self.cfg.max_length

    def answer_source(self, answer_step: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Which input vector the answer step repeats: the same position for copy."""
        return answer_step

    def _sample(self, batch_size, generator, scale, difficulty):
        bits = self.cfg.bits
        lo, hi = self.size_range(self.cfg.min_length, self.cfg.max_length, scale, difficulty)
        lengths = _randint(lo, hi, batch_size, generator)
        L = int(lengths.max())
        seq = torch.randint(0, 2, (batch_size, L, bits), generator=generator).float()  # [B, L, bits]
        T = 2 * L + 1
        t = torch.arange(T)[None, :]  # [1, T]
        n = lengths[:, None]  # [B, 1]
        inputs = torch.zeros(batch_size, T, bits + 1)
        inputs[:, :L, :bits] = seq * (t[:, :L] < n)[..., None]
        inputs[:, :, bits] = (t == n).float()
        answer_step = t - n - 1  # [B, T]: index into the answer, valid in [0, n)
        mask = ((answer_step >= 0) & (answer_step < n)).float()
        source = self.answer_source(answer_step, n).clamp(0, L - 1)
        targets = torch.gather(seq, 1, source[..., None].expand(-1, -1, bits)) * mask[..., None]
        return Batch(inputs, targets, mask)


class ReverseTask(CopyTask):
    """Reverse: as copy, but the answer is the sequence from last vector to first."""

    def answer_source(self, answer_step, lengths):
        return lengths - 1 - answer_step


class RepeatCopyTask(Task):
    """Repeat copy (Graves 2014, §4.2): copy the sequence n times, then raise an end marker.

    Channels: inputs ``[bits | delimiter | repeats]``, outputs ``[bits | end]``. After the L input
    vectors one step carries the delimiter and n normalised to mean 0 and variance 1 over the
    config's range of repeats (as in the paper); then n*L copy steps and one end-marker step, all scored.
    """

    targets_kind = "bits"

    def __init__(self, cfg: RepeatCopyConfig):
        super().__init__(cfg)
        self.input_size = cfg.bits + 2
        self.output_size = cfg.bits + 1
        count = cfg.max_repeats - cfg.min_repeats + 1
        self.repeats_mean = (cfg.min_repeats + cfg.max_repeats) / 2
        self.repeats_std = math.sqrt((count**2 - 1) / 12) or 1.0  # discrete uniform; a single value gives std 0

    def difficulty_limits(self):
        cfg = self.cfg
        return min(cfg.min_length, cfg.min_repeats), max(cfg.max_length, cfg.max_repeats)

    def normalise_repeats(self, repeats: torch.Tensor) -> torch.Tensor:
        return (repeats.double() - self.repeats_mean) / self.repeats_std

    def _sample(self, batch_size, generator, scale, difficulty):
        cfg, bits = self.cfg, self.cfg.bits
        lengths = _randint(*self.size_range(cfg.min_length, cfg.max_length, scale, difficulty), batch_size, generator)
        repeats = _randint(*self.size_range(cfg.min_repeats, cfg.max_repeats, scale, difficulty), batch_size, generator)
        L = int(lengths.max())
        seq = torch.randint(0, 2, (batch_size, L, bits), generator=generator).float()
        T = int((lengths + 1 + repeats * lengths + 1).max())
        t = torch.arange(T)[None, :]
        n, r = lengths[:, None], repeats[:, None]
        inputs = torch.zeros(batch_size, T, bits + 2)
        inputs[:, :L, :bits] = seq * (t[:, :L] < n)[..., None]
        inputs[:, :, bits] = (t == n).float()
        inputs[:, :, bits + 1] = (t == n) * self.normalise_repeats(r).float()
        answer_step = t - n - 1
        copying = (answer_step >= 0) & (answer_step < r * n)
        end = answer_step == r * n
        source = (answer_step.clamp(min=0) % n).clamp(max=L - 1)
        targets = torch.zeros(batch_size, T, bits + 1)
        targets[:, :, :bits] = torch.gather(seq, 1, source[..., None].expand(-1, -1, bits)) * copying[..., None]
        targets[:, :, bits] = end.float()
        return Batch(inputs, targets, (copying | end).float())


class AssociativeRecallTask(Task):
    """Associative recall (Graves 2014, §4.3): after a list of items, given one item, output the next.

    An item is ``item_length`` random bit vectors; items in one sequence are distinct. Channels:
    inputs ``[bits | item delimiter | query delimiter]``, outputs ``[bits]``. Layout for k items of
    length m: k times (item delimiter, m vectors); query delimiter, the query's m vectors, query
    delimiter; m scored steps that should reproduce the item after the query.
    """

    targets_kind = "bits"

    def __init__(self, cfg: AssociativeRecallConfig):
        super().__init__(cfg)
        self.input_size = cfg.bits + 2
        self.output_size = cfg.bits

    def difficulty_limits(self):
        return self.cfg.min_items, self.cfg.max_items

    def _sample(self, batch_size, generator, scale, difficulty):
        cfg, bits, m = self.cfg, self.cfg.bits, self.cfg.item_length
        lo, hi = self.size_range(cfg.min_items, cfg.max_items, scale, difficulty)
        if 2 ** (bits * m) < hi:
            raise ValueError(f"scale {scale}: {hi} distinct items need bits * item_length >= {math.log2(hi):.1f}")
        counts = _randint(lo, hi, batch_size, generator)
        items = torch.randint(0, 2, (batch_size, hi, m, bits), generator=generator).float()
        for b in range(batch_size):
            _redraw_duplicates(items[b, : int(counts[b])], generator)
        # query: any item but the last, so that it has a successor
        queries = _randint(0, counts - 2, batch_size, generator)
        T = int(counts.max()) * (m + 1) + 2 * m + 2
        inputs = torch.zeros(batch_size, T, bits + 2)
        targets = torch.zeros(batch_size, T, bits)
        mask = torch.zeros(batch_size, T)
        for b in range(batch_size):
            k, q = int(counts[b]), int(queries[b])
            for i in range(k):
                start = i * (m + 1)
                inputs[b, start, bits] = 1
                inputs[b, start + 1 : start + 1 + m, :bits] = items[b, i]
            query = k * (m + 1)
            inputs[b, query, bits + 1] = 1
            inputs[b, query + 1 : query + 1 + m, :bits] = items[b, q]
            inputs[b, query + 1 + m, bits + 1] = 1
            answer = query + m + 2
            targets[b, answer : answer + m] = items[b, q + 1]
            mask[b, answer : answer + m] = 1
        return Batch(inputs, targets, mask)


def _redraw_duplicates(items: torch.Tensor, generator: torch.Generator) -> None:
    """Redraw (in place) every item equal to an earlier one until all are distinct. items: [k, m, bits]."""
    while True:
        flat = items.flatten(1)
        same = (flat[:, None, :] == flat[None, :, :]).all(-1)  # [k, k]
        duplicate = same.tril(diagonal=-1).any(1)
        if not duplicate.any():
            return
        items[duplicate] = torch.randint(0, 2, items[duplicate].shape, generator=generator).float()


class PrioritySortTask(Task):
    """Priority sort (Graves 2014, §4.5): output the highest-priority vectors, highest first.

    Channels: inputs ``[bits | priority | delimiter]``, outputs ``[bits]``. n input vectors with
    priorities uniform in [-1, 1], a delimiter step, then the top m vectors in descending priority
    (scored). At difficulty n, m = round(n * num_outputs / num_inputs), so the full task is 20 -> 16.
    """

    targets_kind = "bits"

    def __init__(self, cfg: PrioritySortConfig):
        super().__init__(cfg)
        self.input_size = cfg.bits + 2
        self.output_size = cfg.bits

    def difficulty_limits(self):
        return 1, self.cfg.num_inputs

    def sizes(self, scale: float, difficulty: int) -> tuple[int, int]:
        """(inputs, outputs) of every sequence at this scale (at scale 1: at this difficulty)."""
        cfg = self.cfg
        n = difficulty if scale == 1 else _scaled(cfg.num_inputs, scale)
        return n, min(n, max(1, round(n * cfg.num_outputs / cfg.num_inputs)))

    def _sample(self, batch_size, generator, scale, difficulty):
        bits = self.cfg.bits
        n, m = self.sizes(scale, difficulty)
        seq = torch.randint(0, 2, (batch_size, n, bits), generator=generator).float()
        priority = torch.rand(batch_size, n, generator=generator) * 2 - 1
        order = priority.argsort(dim=1, descending=True)[:, :m]
        T = n + 1 + m
        inputs = torch.zeros(batch_size, T, bits + 2)
        inputs[:, :n, :bits] = seq
        inputs[:, :n, bits] = priority
        inputs[:, n, bits + 1] = 1
        targets = torch.zeros(batch_size, T, bits)
        targets[:, n + 1 :] = torch.gather(seq, 1, order[..., None].expand(-1, -1, bits))
        mask = torch.zeros(batch_size, T)
        mask[:, n + 1 :] = 1
        return Batch(inputs, targets, mask)


# ---------------------------------------------------------------------------------------------
# Class tasks: episodes are built one by one as lists of active input channels, then packed
# ---------------------------------------------------------------------------------------------


class Episode(NamedTuple):
    active: list[list[int]]  # per step, the input channels set to 1
    targets: list[int]  # per step, the class id (0 where unscored)
    mask: list[float]  # per step, 1 where scored


def _pack(episodes: list[Episode], input_size: int) -> Batch:
    """Episodes of different lengths -> one Batch padded at the end."""
    B, T = len(episodes), max(len(e.active) for e in episodes)
    inputs = torch.zeros(B, T, input_size)
    targets = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    index = [(b, t, c) for b, e in enumerate(episodes) for t, channels in enumerate(e.active) for c in channels]
    inputs[tuple(torch.tensor(index).T)] = 1
    for b, e in enumerate(episodes):
        targets[b, : len(e.targets)] = torch.tensor(e.targets)
        mask[b, : len(e.mask)] = torch.tensor(e.mask)
    return Batch(inputs, targets, mask)


class GraphTask(Task):
    """Questions about a random directed graph (DNC paper, Graves et al. 2016, graph tasks).

    The graph arrives as one edge triple (source, label, destination) per step, in random order;
    then the query; then ``planning_steps`` blank steps; then one scored step per answer node.
    Nodes are named by random distinct ids in [0, num_ids); out-edges of a node have distinct labels
    and distinct destinations (no self-loops). Every node has at least one out-edge.

    Input channels (I = num_ids, L = num_labels)::

        [0, I)          source node (edge) / start node (query)
        [I, I+L)        edge label (edge, traversal query)
        [I+L, 2I+L)     destination node (edge) / goal node (shortest-path query)
        2I+L            query flag
        2I+L+1          planning flag
        2I+L+2          answer flag

    traversal: query steps are (start) then one step per label; the answer is the node reached after
    each label. shortest_path: one query step (start, goal); the answer is the unique shortest path's
    nodes after the start, ending at the goal. Targets are node ids (``output_size = num_ids``).
    The number of answer steps equals the answer's length (the answer flag tells the model when to answer).
    """

    targets_kind = "classes"
    max_attempts = 1000  # graphs drawn before giving up on a query that fits the config

    def __init__(self, cfg: GraphConfig):
        super().__init__(cfg)
        I, L = cfg.num_ids, cfg.num_labels
        self.query_flag, self.plan_flag, self.answer_flag = 2 * I + L, 2 * I + L + 1, 2 * I + L + 2
        self.input_size = 2 * I + L + 3
        self.output_size = I

    def difficulty_limits(self):
        return self.cfg.min_nodes, self.cfg.max_nodes

    def _sample(self, batch_size, generator, scale, difficulty):
        lo, hi = self.size_range(self.cfg.min_nodes, self.cfg.max_nodes, scale, difficulty)
        if hi > self.cfg.num_ids:
            raise ValueError(f"scale {scale}: graphs of {hi} nodes need task.num_ids >= {hi}, got {self.cfg.num_ids}")
        sizes = _randint(lo, hi, batch_size, generator)
        rng = _rng(generator)
        return _pack([self.episode(int(n), rng) for n in sizes], self.input_size)

    def random_graph(self, n: int, rng: random.Random) -> list[tuple[int, int, int]]:
        """Edges (source, label, destination) over local nodes 0..n-1, in random order."""
        cfg = self.cfg
        edges = []
        for source in range(n):
            degree = rng.randint(1, min(cfg.max_out_degree, n - 1))
            destinations = rng.sample([v for v in range(n) if v != source], degree)
            labels = rng.sample(range(cfg.num_labels), degree)
            edges += [(source, label, dest) for label, dest in zip(labels, destinations, strict=True)]
        rng.shuffle(edges)
        return edges

    def episode(self, n: int, rng: random.Random) -> Episode:
        cfg = self.cfg
        I, L = cfg.num_ids, cfg.num_labels
        ids = rng.sample(range(I), n)  # random names, so that nothing can be learned about a particular id
        for _ in range(self.max_attempts):
            edges = self.random_graph(n, rng)
            question = self.traversal(n, edges, rng) if cfg.mode == "traversal" else self.shortest_path(n, edges, rng)
            if question is not None:
                break
        else:
            raise RuntimeError(f"graph: no {cfg.mode} query of length {cfg.min_path}..{cfg.max_path} in "
                               f"{self.max_attempts} random graphs of {n} nodes")
        query, answer = question
        active = [[ids[s], I + label, I + L + ids[d]] for s, label, d in edges]
        for start, label, goal in query:
            channels = [] if start is None else [ids[start]]
            channels += [] if label is None else [I + label]
            channels += [] if goal is None else [I + L + ids[goal]]
            active.append([*channels, self.query_flag])
        active += [[self.plan_flag]] * cfg.planning_steps
        active += [[self.answer_flag]] * len(answer)
        before = len(active) - len(answer)
        return Episode(active, [0] * before + [ids[v] for v in answer], [0.0] * before + [1.0] * len(answer))

    # A question is (query steps, answer nodes); a query step is (start, label, goal), None where empty.

    def traversal(self, n, edges, rng):
        """A random walk of min_path..max_path labels from a random start; the answer is the nodes visited."""
        out = _out_edges(n, edges)
        start = node = rng.randrange(n)
        query, visited = [(start, None, None)], []
        for _ in range(rng.randint(self.cfg.min_path, self.cfg.max_path)):
            label, node = rng.choice(out[node])  # every node has an out-edge, so the walk never stops
            query.append((None, label, None))
            visited.append(node)
        return query, visited

    def shortest_path(self, n, edges, rng):
        """A (start, goal) with a unique shortest path of min_path..max_path edges, or None if this graph has none."""
        cfg, out = self.cfg, _out_edges(n, edges)
        for start in rng.sample(range(n), n):
            distance, paths, parent = _bfs(out, start)
            goals = [v for v in range(n) if paths[v] == 1 and cfg.min_path <= distance[v] <= cfg.max_path]
            if goals:
                path = [rng.choice(goals)]
                while parent[path[-1]] != start:
                    path.append(parent[path[-1]])
                return [(start, None, path[0])], path[::-1]
        return None


def _out_edges(n: int, edges: list[tuple[int, int, int]]) -> list[list[tuple[int, int]]]:
    """Per node, its (label, destination) pairs, sorted so that the walk depends only on the rng."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for source, label, dest in edges:
        out[source].append((label, dest))
    return [sorted(pairs) for pairs in out]


def _bfs(out: list[list[tuple[int, int]]], start: int) -> tuple[list[float], list[int], list[int]]:
    """Breadth-first search: per node its distance, its number of shortest paths (capped at 2), a parent."""
    n = len(out)
    distance, paths, parent = [math.inf] * n, [0] * n, [-1] * n
    distance[start], paths[start] = 0, 1
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for _, v in out[u]:
            if distance[v] == math.inf:
                distance[v], parent[v] = distance[u] + 1, u
                queue.append(v)
            if distance[v] == distance[u] + 1:
                paths[v] = min(2, paths[v] + paths[u])
    return distance, paths, parent


# bAbI-style vocabulary: fixed, so the input size never depends on the config.
PEOPLE = ("mary", "john", "sandra", "daniel")
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVE_VERBS = (("went",), ("journeyed",), ("travelled",), ("moved",))  # followed by "to the <place>"
GET_VERBS = (("got",), ("grabbed",), ("picked", "up"), ("took",))
DROP_VERBS = (("dropped",), ("discarded",), ("put", "down"), ("left",))
ANSWER_WORD = "-"  # input at the answer step, as the DNC paper marked bAbI answers
VOCABULARY = tuple(dict.fromkeys([
    *PEOPLE, *PLACES, *OBJECTS,
    *(w for verbs in (MOVE_VERBS, GET_VERBS, DROP_VERBS) for verb in verbs for w in verb),
    "to", "the", "where", "is", ".", "?", ANSWER_WORD,
]))


class BabiTwoFactsTask(Task):
    """Stories in the style of bAbI task 2, "two supporting facts", generated here.

    People move between places, pick up and drop objects; questions ``where is the <object> ?``
    need who holds the object and where that person went last. One word per step, one-hot over
    :data:`VOCABULARY`; facts end with ".", questions with "?", followed by one answer step whose
    input is "-" and whose target is the place (class id = index in :data:`PLACES`). A question
    follows every ``question_every`` facts when some object's place is known, and one ends the story.
    """

    targets_kind = "classes"
    vocabulary = VOCABULARY
    places = PLACES

    def __init__(self, cfg: BabiTwoFactsConfig):
        super().__init__(cfg)
        self.input_size = len(VOCABULARY)
        self.output_size = len(PLACES)
        self.word_index = {w: i for i, w in enumerate(VOCABULARY)}

    def difficulty_limits(self):
        return self.cfg.min_facts, self.cfg.max_facts

    def _sample(self, batch_size, generator, scale, difficulty):
        lo, hi = self.size_range(self.cfg.min_facts, self.cfg.max_facts, scale, difficulty)
        facts = _randint(lo, hi, batch_size, generator)
        rng = _rng(generator)
        return _pack([self.episode(int(s), rng) for s in facts], self.input_size)

    def episode(self, num_facts: int, rng: random.Random) -> Episode:
        while True:  # a story whose objects never get a known place has no question: draw another
            words, answers = self.story(num_facts, rng)
            if answers:
                break
        active = [[self.word_index[w]] for w in words]
        targets, mask = [0] * len(words), [0.0] * len(words)
        for step, place in answers.items():
            targets[step], mask[step] = PLACES.index(place), 1.0
        return Episode(active, targets, mask)

    def story(self, num_facts: int, rng: random.Random) -> tuple[list[str], dict[int, str]]:
        """Words of a story with its questions, and {answer step: place}."""
        location: dict[str, str | None] = dict.fromkeys(PEOPLE)  # where each person is
        holder: dict[str, str | None] = dict.fromkeys(OBJECTS)  # who carries each object
        lying: dict[str, str | None] = dict.fromkeys(OBJECTS)  # where a dropped object lies

        def place_of(obj: str) -> str | None:
            return location[holder[obj]] if holder[obj] else lying[obj]

        words: list[str] = []
        answers: dict[int, str] = {}
        for fact in range(1, num_facts + 1):
            moves = [(p, pl) for p in PEOPLE for pl in PLACES if pl != location[p]]
            gets = [(p, o) for p in PEOPLE if location[p] for o in OBJECTS
                    if holder[o] is None and lying[o] in (None, location[p])]
            drops = [(holder[o], o) for o in OBJECTS if holder[o]]
            # moving is most common, as in bAbI; gets and drops only when possible
            kinds = [(k, options, w) for k, options, w in (("move", moves, 5), ("get", gets, 3), ("drop", drops, 2))
                     if options]
            kind, options, _ = rng.choices(kinds, weights=[w for *_, w in kinds])[0]
            subject, thing = rng.choice(options)
            if kind == "move":
                location[subject] = thing
                words += [subject, *rng.choice(MOVE_VERBS), "to", "the", thing, "."]
            elif kind == "get":
                holder[thing], lying[thing] = subject, None
                words += [subject, *rng.choice(GET_VERBS), "the", thing, "."]
            else:
                holder[thing], lying[thing] = None, location[subject]
                words += [subject, *rng.choice(DROP_VERBS), "the", thing, "."]
            known = [o for o in OBJECTS if place_of(o)]
            if known and (fact % self.cfg.question_every == 0 or fact == num_facts):
                obj = rng.choice(known)
                words += ["where", "is", "the", obj, "?", ANSWER_WORD]
                answers[len(words) - 1] = place_of(obj)
        return words, answers


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskEntry:
    config_class: type
    task_class: type
    description: str = ""


TASKS: dict[str, TaskEntry] = {
    "copy": TaskEntry(CopyConfig, CopyTask, "copy a sequence of bit vectors (Graves 2014, 4.1)"),
    "repeat_copy": TaskEntry(RepeatCopyConfig, RepeatCopyTask, "copy a sequence n times (Graves 2014, 4.2)"),
    "associative_recall": TaskEntry(
        AssociativeRecallConfig, AssociativeRecallTask, "recall the item after a query item (Graves 2014, 4.3)"
    ),
    "reverse": TaskEntry(ReverseConfig, ReverseTask, "output a sequence of bit vectors backwards"),
    "priority_sort": TaskEntry(
        PrioritySortConfig, PrioritySortTask, "sort vectors by priority, keep the top ones (Graves 2014, 4.5)"
    ),
    "graph": TaskEntry(GraphConfig, GraphTask, "traversal / shortest path on random graphs (Graves 2016)"),
    "babi_two_facts": TaskEntry(
        BabiTwoFactsConfig, BabiTwoFactsTask, "generated bAbI-style stories, task 2: two supporting facts"
    ),
}


def task_entry(name: str) -> TaskEntry:
    if name not in TASKS:
        raise ConfigError("task", "one of " + ", ".join(sorted(TASKS)), name)
    return TASKS[name]


def make_task_config(name: str, overrides: Mapping[str, Any] | None = None) -> TaskConfig:
    """The task's frozen config: class defaults, then ``overrides`` (keys without the ``task.`` prefix)."""
    return replace_checked(task_entry(name).config_class(), overrides or {}, prefix="task.")


def task_fields(name: str) -> set[str]:
    """The keys ``task.<key>`` accepted for this task."""
    return {f.name for f in dataclasses.fields(task_entry(name).config_class)}


def build_task(name: str, cfg: TaskConfig | None = None) -> Task:
    """The task object for ``cfg`` (defaults when None)."""
    entry = task_entry(name)
    cfg = make_task_config(name) if cfg is None else cfg
    if type(cfg) is not entry.config_class:
        raise TypeError(f"build_task({name!r}): expected a {entry.config_class.__name__}, got {type(cfg).__name__}")
    return entry.task_class(cfg)
