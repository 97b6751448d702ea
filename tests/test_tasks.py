"""Algorithmic tasks: determinism, shapes and masks, correct answers, metrics, loss, curriculum, config errors."""

import math
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mann.config import ConfigError
from mann.tasks import (
    OBJECTS,
    PEOPLE,
    PLACES,
    TASKS,
    VOCABULARY,
    Batch,
    Score,
    build_task,
    make_task_config,
    metric_unit,
    task_fields,
)

CASES = [
    ("copy", {}),
    ("repeat_copy", {}),
    ("associative_recall", {}),
    ("reverse", {}),
    ("priority_sort", {}),
    ("graph", {"mode": "traversal"}),
    ("graph", {"mode": "shortest_path", "min_path": 2}),
    ("babi_two_facts", {}),
]
IDS = [name + ("-" + over["mode"] if "mode" in over else "") for name, over in CASES]


def task_of(name, overrides=None, curriculum=False):
    return build_task(name, make_task_config(name, {**(overrides or {}), "curriculum": curriculum}))


def sample(task, batch_size=8, seed=0, scale=1.0):
    return task.sample(batch_size, torch.Generator().manual_seed(seed), scale)


def perfect_logits(task, batch, confidence=10.0):
    if task.targets_kind == "bits":
        return (2 * batch.targets - 1) * confidence
    return F.one_hot(batch.targets, task.output_size).float() * confidence


def answer_steps(batch, b):
    return torch.nonzero(batch.mask[b]).flatten().tolist()


def test_every_registered_task_is_covered():
    assert {name for name, _ in CASES} == set(TASKS)


# --- determinism, shapes, masks ------------------------------------------------------------------


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_same_generator_state_gives_the_same_batch(name, overrides):
    task = task_of(name, overrides)
    first, second, other = sample(task, seed=3), sample(task, seed=3), sample(task, seed=4)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(first, other, strict=True))


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_shapes_dtypes_masks_and_padding_at_every_scale(name, overrides):
    task = task_of(name, overrides, curriculum=True)  # scale 1 is then at the smallest difficulty
    lengths = {}
    for scale in (1, 2, 4):
        batch = sample(task, batch_size=6, scale=scale)
        assert isinstance(batch, Batch)
        B, T, _ = batch.inputs.shape
        assert batch.inputs.shape == (6, T, task.input_size) and batch.inputs.dtype == torch.float32
        assert batch.mask.shape == (6, T) and batch.mask.dtype == torch.float32
        if task.targets_kind == "bits":
            assert batch.targets.shape == (6, T, task.output_size) and batch.targets.dtype == torch.float32
            assert set(batch.targets.unique().tolist()) <= {0.0, 1.0}
        else:
            assert batch.targets.shape == (6, T) and batch.targets.dtype == torch.int64
            assert 0 <= batch.targets.min() and batch.targets.max() < task.output_size
        assert set(batch.mask.unique().tolist()) <= {0.0, 1.0}
        for x in batch:
            assert x.device.type == "cpu"
        # every episode is scored and ends with its answer; after it there is only padding
        ends = []
        for b in range(B):
            steps = answer_steps(batch, b)
            assert steps, "an episode without a scored step"
            end = steps[-1] + 1
            ends.append(end)
            assert not batch.inputs[b, end:].any() and not batch.mask[b, end:].any()
            if task.targets_kind == "bits":
                assert not batch.targets[b, end:].any()
                assert not batch.targets[b][batch.mask[b] == 0].any()  # unscored targets are 0
        assert max(ends) == T  # padded to the longest episode, no further
        lengths[scale] = T
    assert lengths[1] < lengths[2] < lengths[4]


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_scale_below_one_is_refused(name, overrides):
    with pytest.raises(ValueError, match="scale"):
        sample(task_of(name, overrides), scale=0.5)


# --- the answers are right ------------------------------------------------------------------------


def copy_sequences(batch, bits):
    """Per episode: its input vectors (everything before the delimiter)."""
    out = []
    for b in range(batch.inputs.shape[0]):
        delimiter = int(torch.nonzero(batch.inputs[b, :, bits]).flatten()[0])
        out.append(batch.inputs[b, :delimiter, :bits])
    return out


@pytest.mark.parametrize("scale", [1, 2])
def test_copy_target_is_the_input_and_reverse_is_reversed(scale):
    for name in ("copy", "reverse"):
        task = task_of(name)
        batch = sample(task, batch_size=16, scale=scale)
        for b, seq in enumerate(copy_sequences(batch, task.cfg.bits)):
            L = seq.shape[0]
            lo, hi = (1, 20) if scale == 1 else (21, 40)
            assert lo <= L <= hi
            answer = batch.targets[b, answer_steps(batch, b)]
            assert answer_steps(batch, b) == list(range(L + 1, 2 * L + 1))
            expected = seq if name == "copy" else seq.flip(0)
            assert torch.equal(answer, expected)
            assert not batch.inputs[b, L + 1 :].any()  # no input while answering


def test_repeat_copy_repeats_the_sequence_then_marks_the_end():
    task = task_of("repeat_copy")
    bits = task.cfg.bits
    batch = sample(task, batch_size=16)
    repeats_seen = set()
    for b, seq in enumerate(copy_sequences(batch, bits)):
        L = seq.shape[0]
        code = batch.inputs[b, L, bits + 1].item()
        repeats = round(code * task.repeats_std + task.repeats_mean)
        repeats_seen.add(repeats)
        assert 1 <= repeats <= 10
        answer = batch.targets[b, answer_steps(batch, b)]
        assert answer.shape[0] == repeats * L + 1
        assert torch.equal(answer[:-1, :bits], seq.repeat(repeats, 1))
        assert not answer[:-1, bits].any() and answer[-1, bits] == 1 and not answer[-1, :bits].any()
    assert len(repeats_seen) > 1
    # the count channel is normalised to mean 0, variance 1 over 1..10, as in the paper
    counts = torch.arange(1, 11)
    codes = task.normalise_repeats(counts)
    assert codes.mean().abs() < 1e-9 and abs(codes.var(unbiased=False).item() - 1) < 1e-9


@pytest.mark.parametrize(
    "overrides, scales, sizes",
    [
        ({}, (1, 2), {1: (2, 6), 2: (7, 12)}),
        # 4 possible items, up to 4 per sequence: duplicates are drawn often and must be redrawn
        ({"bits": 1, "item_length": 2, "min_items": 4, "max_items": 4}, (1,), {1: (4, 4)}),
    ],
)
def test_associative_recall_answer_is_the_item_after_the_query(overrides, scales, sizes):
    task = task_of("associative_recall", overrides)
    bits, m = task.cfg.bits, task.cfg.item_length
    for scale in scales:
        batch = sample(task, batch_size=16, scale=scale)
        for b in range(16):
            x = batch.inputs[b]
            starts = torch.nonzero(x[:, bits]).flatten().tolist()
            items = [x[s + 1 : s + 1 + m, :bits] for s in starts]
            assert sizes[scale][0] <= len(items) <= sizes[scale][1]
            assert len({tuple(i.flatten().tolist()) for i in items}) == len(items)  # distinct items
            q0, q1 = torch.nonzero(x[:, bits + 1]).flatten().tolist()
            query = x[q0 + 1 : q1, :bits]
            position = [i for i, item in enumerate(items) if torch.equal(item, query)]
            assert len(position) == 1 and position[0] < len(items) - 1
            assert answer_steps(batch, b) == list(range(q1 + 1, q1 + 1 + m))
            assert torch.equal(batch.targets[b, q1 + 1 : q1 + 1 + m], items[position[0] + 1])


@pytest.mark.parametrize("overrides, n, m", [({}, 20, 16), ({"num_inputs": 6, "num_outputs": 3}, 6, 3)])
def test_priority_sort_outputs_the_top_vectors_by_descending_priority(overrides, n, m):
    task = task_of("priority_sort", overrides)
    bits = task.cfg.bits
    batch = sample(task, batch_size=16)
    assert batch.inputs.shape[1] == n + 1 + m
    for b in range(16):
        vectors, priority = batch.inputs[b, :n, :bits], batch.inputs[b, :n, bits]
        assert priority.min() >= -1 and priority.max() <= 1
        answer = batch.targets[b, answer_steps(batch, b)]
        assert answer.shape[0] == m
        # walk the priorities from highest down: each output is the vector of the next-highest priority
        ranked = sorted(range(n), key=lambda i: -priority[i].item())
        assert all(torch.equal(answer[k], vectors[ranked[k]]) for k in range(m))
        assert all(priority[ranked[k]] >= priority[ranked[k + 1]] for k in range(m - 1))


def decode_graph(task, batch, b):
    """(edges {(src, label): dst}, query steps [(src, label, dst)], answer ids) from one episode."""
    I, L = task.cfg.num_ids, task.cfg.num_labels
    x = batch.inputs[b]

    def one(part):
        hot = torch.nonzero(part).flatten().tolist()
        assert len(hot) <= 1
        return hot[0] if hot else None

    edges, query = {}, []
    for t in range(x.shape[0]):
        src, label, dst = one(x[t, :I]), one(x[t, I : I + L]), one(x[t, I + L : 2 * I + L])
        if x[t, task.query_flag]:
            query.append((src, label, dst))
        elif src is not None:
            assert label is not None and dst is not None and src != dst
            assert (src, label) not in edges  # out-edge labels are unique per node
            edges[(src, label)] = dst
    steps = answer_steps(batch, b)
    assert all(x[t, task.answer_flag] == 1 for t in steps)
    return edges, query, batch.targets[b, steps].tolist()


def bfs_count(edges, start):
    """Distances from start and the number of shortest paths to each node."""
    out = {}
    for (src, _), dst in edges.items():
        out.setdefault(src, []).append(dst)
    dist, count, queue = {start: 0}, {start: 1}, deque([start])
    while queue:
        u = queue.popleft()
        for v in out.get(u, []):
            if v not in dist:
                dist[v], count[v] = dist[u] + 1, 0
                queue.append(v)
            if dist[v] == dist[u] + 1:
                count[v] += count[u]
    return dist, count


@pytest.mark.parametrize("scale", [1, 2])
def test_graph_traversal_answers_follow_the_edges(scale):
    task = task_of("graph", {"mode": "traversal"})
    batch = sample(task, batch_size=16, scale=scale)
    for b in range(16):
        edges, query, answer = decode_graph(task, batch, b)
        nodes = {s for s, _ in edges} | set(edges.values())
        assert (3 <= len(nodes) <= 10) if scale == 1 else (11 <= len(nodes) <= 20)
        assert all(any(s == node for s, _ in edges) for node in nodes)  # every node has an out-edge
        (start, none1, none2), *label_steps = query
        assert none1 is None and none2 is None
        labels = [label for src, label, dst in label_steps]
        assert all(src is None and dst is None for src, _, dst in label_steps)
        assert 1 <= len(labels) == len(answer) <= 4
        node = start
        for label, expected in zip(labels, answer, strict=True):
            node = edges[(node, label)]
            assert node == expected


@pytest.mark.parametrize("scale", [1, 4])
def test_graph_shortest_paths_are_shortest_and_unique(scale):
    task = task_of("graph", {"mode": "shortest_path", "min_path": 2, "planning_steps": 3})
    batch = sample(task, batch_size=16, scale=scale)
    for b in range(16):
        edges, query, answer = decode_graph(task, batch, b)
        [(start, label, goal)] = query
        assert label is None
        dist, count = bfs_count(edges, start)
        assert answer[-1] == goal and len(answer) == dist[goal] and 2 <= dist[goal] <= 4
        assert count[goal] == 1
        succ = {}
        for (src, _), dst in edges.items():
            succ.setdefault(src, set()).add(dst)
        path = [start, *answer]
        assert all(v in succ[u] for u, v in zip(path, path[1:], strict=False))
        first_answer = answer_steps(batch, b)[0]
        assert batch.inputs[b, first_answer - 3 : first_answer, task.plan_flag].tolist() == [1, 1, 1]


def replay_babi(words):
    """A reader of the story: [(answer index in words, expected place)] from the facts before each question."""
    location, holder, lying, answers = {}, {}, {}, []
    sentence = []
    for i, word in enumerate(words):
        if word == "-":
            obj = sentence[3]
            answers.append((i, location[holder[obj]] if holder.get(obj) else lying[obj]))
            sentence = []
            continue
        sentence.append(word)
        if word == ".":
            who, what = sentence[0], sentence[-2]
            assert who in PEOPLE
            if what in PLACES:
                location[who] = what
            elif sentence[1] in ("got", "grabbed", "picked", "took"):
                assert holder.get(what) is None
                holder[what], lying[what] = who, None
            else:
                assert holder[what] == who and sentence[1] in ("dropped", "discarded", "put", "left")
                holder[what], lying[what] = None, location[who]
            sentence = []
        elif word == "?":
            assert sentence[:3] == ["where", "is", "the"] and sentence[3] in OBJECTS
    return answers


@pytest.mark.parametrize("scale", [1, 2])
def test_babi_answers_agree_with_a_replay_of_the_story(scale):
    task = task_of("babi_two_facts")
    batch = sample(task, batch_size=16, scale=scale)
    assert batch.inputs.sum(-1).max() == 1  # one word per step
    for b in range(16):
        steps = int(batch.inputs[b].sum())
        words = [VOCABULARY[i] for i in batch.inputs[b, :steps].argmax(-1).tolist()]
        facts = words.count(".")
        assert (2 <= facts <= 20) if scale == 1 else (21 <= facts <= 40)
        answers = replay_babi(words)
        assert [i for i, _ in answers] == answer_steps(batch, b)
        assert [PLACES[batch.targets[b, i]] for i, _ in answers] == [place for _, place in answers]
        if facts >= 6:
            assert len(answers) >= 2  # several questions per story


# --- metrics and loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_perfect_logits_give_zero_error_whatever_the_unscored_steps_say(name, overrides):
    task = task_of(name, overrides)
    batch = sample(task)
    logits = perfect_logits(task, batch)
    noise = torch.randn_like(logits) * 10
    logits = torch.where(batch.mask[..., None] > 0, logits, noise)
    metrics = task.metrics(logits, batch)
    assert set(metrics) == {"error", "cost_bits", "accuracy"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["error"] == 0 and metrics["accuracy"] == 1
    assert 0 < metrics["cost_bits"] < 0.1  # confident and right: a small cost, never negative


@pytest.mark.parametrize("name", ["copy", "repeat_copy", "associative_recall", "reverse", "priority_sort"])
def test_bit_task_error_counts_wrong_bits_per_sequence(name):
    task = task_of(name)
    batch = sample(task)
    B = batch.inputs.shape[0]
    inverted = task.metrics(-perfect_logits(task, batch), batch)
    scored_bits = batch.mask.sum() * task.output_size
    assert inverted["error"] == pytest.approx(scored_bits.item() / B) and inverted["accuracy"] == 0
    # one wrong bit in one sequence: 1/B bits per sequence, one sequence of B not fully right
    logits = perfect_logits(task, batch)
    logits[0, answer_steps(batch, 0)[0], 0] *= -1
    one = task.metrics(logits, batch)
    assert one["error"] == pytest.approx(1 / B) and one["accuracy"] == pytest.approx((B - 1) / B)


def _log2_sigmoid(x):
    return -np.logaddexp(0.0, -x) / np.log(2)


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_cost_bits_is_the_summed_cross_entropy_per_sequence_in_bits(name, overrides):
    task = task_of(name, overrides)
    batch = sample(task)
    logits = torch.randn(*batch.mask.shape, task.output_size, generator=torch.Generator().manual_seed(3)) * 3
    x, mask = logits.double().numpy(), batch.mask.numpy()
    B = x.shape[0]
    if task.targets_kind == "bits":
        t = batch.targets.numpy()
        per_bit = -(t * _log2_sigmoid(x) + (1 - t) * _log2_sigmoid(-x))  # BCE in bits
        expected = (per_bit * mask[..., None]).sum() / B
    else:
        log_p = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
        picked = np.take_along_axis(log_p, batch.targets.numpy()[..., None], axis=-1)[..., 0]
        expected = (-picked / np.log(2) * mask).sum() / B
    assert task.metrics(logits, batch)["cost_bits"] == pytest.approx(expected, rel=1e-6)
    # two batches' Scores add up to the per-sequence mean over both
    other = sample(task, seed=1)
    zeros = torch.zeros(*other.mask.shape, task.output_size)
    both = task.score(logits, batch).plus(task.score(zeros, other))
    expected_other = task.metrics(zeros, other)["cost_bits"]
    assert both.sequences == 16 and both.metrics()["cost_bits"] == pytest.approx((expected + expected_other) / 2)


def test_scores_add_up_and_nothing_counted_is_nan():
    a, b = Score(4, 6, 4, 10.0, 1), Score(2, 0, 2, 2.0, 2)
    assert a.plus(b).metrics() == {"error": 1.0, "cost_bits": 2.0, "accuracy": 0.5}
    assert all(math.isnan(v) for v in Score().metrics().values())


def test_metric_units_cover_prefixed_names():
    assert metric_unit("error") and metric_unit("gen2x_cost_bits") == metric_unit("cost_bits")
    assert metric_unit("final_gen2.5x_accuracy") == metric_unit("accuracy") == "fraction of sequences entirely right"
    assert metric_unit("final_error") == metric_unit("error") and metric_unit("nope") == ""


def test_class_error_is_per_answer():
    # bAbI: each question's single answer word is one answer
    task = task_of("babi_two_facts", {"min_facts": 8})
    batch = sample(task)
    answers = int(batch.mask.sum())
    logits = perfect_logits(task, batch)
    step = answer_steps(batch, 0)[0]
    logits[0, step] = logits[0, step].roll(1)
    metrics = task.metrics(logits, batch)
    assert metrics["error"] == pytest.approx(1 / answers) and metrics["accuracy"] == pytest.approx(7 / 8)
    # graph: the whole node sequence is one answer, wrong if any node is
    task = task_of("graph", {"min_path": 3})
    batch = sample(task)
    logits = perfect_logits(task, batch)
    for step in answer_steps(batch, 0)[:2]:
        logits[0, step] = logits[0, step].roll(1)
    assert task.metrics(logits, batch)["error"] == pytest.approx(1 / 8)
    wrong = perfect_logits(task, batch).roll(1, dims=-1)
    metrics = task.metrics(wrong, batch)
    assert (metrics["error"], metrics["accuracy"]) == (1.0, 0.0) and metrics["cost_bits"] > 0


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_loss_is_masked_lower_for_correct_logits_and_works_in_float64(name, overrides):
    task = task_of(name, overrides)
    batch = sample(task)
    good = perfect_logits(task, batch, confidence=5.0)
    noise = torch.randn(good.shape, generator=torch.Generator().manual_seed(1))
    assert task.loss(good, batch) < task.loss(noise, batch) < task.loss(-good if task.targets_kind == "bits"
                                                                         else good.roll(1, dims=-1), batch)
    # unscored steps do not count
    moved = torch.where(batch.mask[..., None] > 0, noise, noise + 100)
    assert task.loss(moved, batch).item() == pytest.approx(task.loss(noise, batch).item(), rel=1e-6)
    logits64 = noise.double().requires_grad_()
    loss64 = task.loss(logits64, batch)
    assert loss64.dtype == torch.float64 and loss64.dim() == 0
    loss64.backward()
    assert logits64.grad[batch.mask == 0].abs().max() == 0 and logits64.grad.abs().sum() > 0
    # averaged per scored element: all-zero logits give log 2 per bit / log C per answer
    zero = task.loss(torch.zeros_like(noise), batch).item()
    expected = math.log(2) if task.targets_kind == "bits" else math.log(task.output_size)
    assert zero == pytest.approx(expected, rel=1e-5)


# --- curriculum ------------------------------------------------------------------------------------


def test_curriculum_raises_difficulty_only_below_threshold_up_to_the_maximum():
    task = task_of("copy", curriculum=True)  # start 2, step 2, max 20, threshold 0.1
    assert task.level == 0 and task.difficulty == 2
    assert sample(task, batch_size=64).mask.sum(1).max() <= 2
    assert task.update_curriculum(0.5) is False and task.update_curriculum(math.nan) is False
    assert task.level == 0 and task.difficulty == 2
    assert task.update_curriculum(0.05) is True
    assert task.level == 1 and task.difficulty == 4
    assert sample(task, batch_size=64).mask.sum(1).max() == 4
    while task.update_curriculum(0.0):
        pass
    assert task.difficulty == 20 and task.level == 9
    assert task.update_curriculum(0.0) is False and task.level == 9
    # generalization ignores the curriculum: always beyond the training maximum
    assert sample(task_of("copy", curriculum=True), batch_size=64, scale=2).mask.sum(1).min() >= 21


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_full_difficulty_ignores_the_curriculum_level(name, overrides):
    # at level 0, full=True draws from the whole training range, as the same task with the curriculum off
    task = task_of(name, overrides, curriculum=True)
    off = task_of(name, overrides, curriculum=False)
    assert task.difficulty < task.difficulty_limits()[1]
    full = task.sample(32, torch.Generator().manual_seed(5), full=True)
    same = off.sample(32, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(full, same, strict=True))
    at_level = task.sample(32, torch.Generator().manual_seed(5))
    assert at_level.inputs.shape[1] < full.inputs.shape[1]  # the curriculum's sequences are shorter
    assert task.level == 0  # sampling at full difficulty leaves the curriculum alone


def test_curriculum_start_below_the_minimum_starts_at_the_minimum():
    task = task_of("graph", {"min_nodes": 5}, curriculum=True)
    assert task.difficulty == 5
    task.update_curriculum(0.0)
    assert task.difficulty == 6


def test_curriculum_off_is_the_maximum_from_the_start():
    for name, overrides in CASES:
        task = task_of(name, overrides, curriculum=False)
        assert task.difficulty == task.difficulty_limits()[1]
        assert task.update_curriculum(0.0) is False and task.level == 0


def test_curriculum_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    task = task_of("priority_sort", curriculum=True)
    task.update_curriculum(0.0)
    task.update_curriculum(0.0)
    path = tmp_path / "task.pt"
    torch.save({"task": task.state_dict()}, path)
    fresh = task_of("priority_sort", curriculum=True)
    fresh.load_state_dict(torch.load(path, weights_only=True)["task"])
    assert fresh.level == 2 and fresh.difficulty == task.difficulty == 8
    assert torch.equal(sample(fresh).inputs, sample(task).inputs)
    with pytest.raises(ValueError, match="level"):
        fresh.load_state_dict({"level": -1})


# --- configuration ---------------------------------------------------------------------------------


def test_configs_are_frozen_and_overrides_are_coerced():
    cfg = make_task_config("copy", {"max_length": "5", "curriculum": "false"})
    assert cfg.max_length == 5 and cfg.curriculum is False
    with pytest.raises(AttributeError):
        cfg.max_length = 6
    assert {"bits", "max_length", "curriculum", "target_error"} <= task_fields("copy")
    assert "mode" in task_fields("graph")
    assert build_task("graph").target_error == 0.05
    with pytest.raises(TypeError):
        build_task("graph", make_task_config("copy"))


@pytest.mark.parametrize(
    "name, overrides, key",
    [
        ("copy", {"max_length": 0}, "task.max_length"),
        ("copy", {"min_length": 5, "max_length": 3}, "task.max_length"),
        ("copy", {"bits": 2.5}, "task.bits"),
        ("copy", {"nope": 1}, "task.nope"),
        ("reverse", {"curriculum_step": 0}, "task.curriculum_step"),
        ("repeat_copy", {"max_repeats": 0}, "task.max_repeats"),
        ("associative_recall", {"min_items": 1}, "task.min_items"),
        ("associative_recall", {"bits": 1, "item_length": 2, "max_items": 5}, "task.max_items"),
        ("priority_sort", {"num_outputs": 30}, "task.num_outputs"),
        ("priority_sort", {"curriculum_threshold": 0}, "task.curriculum_threshold"),
        ("graph", {"mode": "dfs"}, "task.mode"),
        ("graph", {"num_ids": 5}, "task.num_ids"),
        ("graph", {"max_out_degree": 9}, "task.max_out_degree"),
        ("graph", {"mode": "shortest_path", "min_path": 3}, "task.min_path"),
        ("babi_two_facts", {"min_facts": 1}, "task.min_facts"),
        ("babi_two_facts", {"target_error": -1}, "task.target_error"),
    ],
)
def test_bad_config_values_name_the_task_key(name, overrides, key):
    with pytest.raises(ConfigError) as info:
        make_task_config(name, overrides)
    assert info.value.key == key and "\n" not in str(info.value)


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        make_task_config("sorting")
    assert info.value.key == "task" and "copy" in info.value.expected and "babi_two_facts" in info.value.expected


def test_a_scale_the_config_cannot_name_is_a_one_line_error():
    task = task_of("graph", {"num_ids": 12})
    with pytest.raises(ValueError, match="num_ids"):
        sample(task, scale=2)


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_sum_loss_is_the_scored_elements_summed_per_sequence(name, overrides):
    """loss_reduction: sum = sum of the per-element losses over scored elements / batch size (Collier & Beel's
    ``reduce_sum(cross_entropy) / batch_size``), recomputed here element by element."""
    task = task_of(name, {**overrides, "loss_reduction": "sum"})
    batch = sample(task, batch_size=5)
    logits = torch.randn(*batch.mask.shape, task.output_size, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)
    total = 0.0
    for b, t in torch.nonzero(batch.mask).tolist():
        if task.targets_kind == "bits":
            p = torch.sigmoid(logits[b, t])
            y = batch.targets[b, t].double()
            total += float(-(y * p.log() + (1 - y) * (1 - p).log()).sum())
        else:
            total += float(-torch.log_softmax(logits[b, t], -1)[batch.targets[b, t]])
    assert task.loss(logits, batch).item() == pytest.approx(total / 5, rel=1e-9)
    mean = task_of(name, overrides).loss(logits, batch).item()
    elements = batch.mask.sum().item() * (task.output_size if task.targets_kind == "bits" else 1)
    assert mean == pytest.approx(total / elements, rel=1e-9)
