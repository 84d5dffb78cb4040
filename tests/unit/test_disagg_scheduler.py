"""The attention-server scheduler: determinism, balance on skewed mixes, bytes accounting."""

import random

import numpy as np
import pytest

from lctrain.disagg.scheduler import AttentionShape, plan_from_lengths, schedule
from lctrain.disagg.tasks import make_tasks, task_cost

SHAPE = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=8, dtype_bytes=2)


def skewed_lengths(num_workers, tokens, seed, long_docs=((0, 0.9),)):
    """Every worker holds ``tokens`` tokens of short log-normal documents; the workers in
    ``long_docs`` (worker, fraction) also hold one long document (the straggler)."""
    rng = np.random.default_rng(seed)
    long_of = dict(long_docs)
    lengths = []
    for worker in range(num_workers):
        docs = [int(tokens * long_of[worker])] if worker in long_of else []
        while sum(docs) < tokens:
            docs.append(min(max(1, int(rng.lognormal(np.log(200), 1.0))), tokens - sum(docs)))
        lengths.append(docs)
    return lengths


def colocated_imbalance(lengths):
    work = [sum(n * (n + 1) // 2 for n in docs) for docs in lengths]
    return max(work) / np.mean(work)


@pytest.mark.parametrize("mode,num_servers", [("colocated", None), ("dedicated", 8), ("dedicated", 5)])
def test_imbalance_bound_on_skewed_mix(mode, num_servers):
    lengths = skewed_lengths(8, 32768, seed=0, long_docs=((0, 0.9), (5, 0.5)))
    assert colocated_imbalance(lengths) > 3  # the straggler colocated attention would have
    plan = plan_from_lengths(lengths, SHAPE, mode=mode, num_servers=num_servers)
    assert plan.imbalance <= 1.05
    total = sum(n * (n + 1) // 2 for docs in lengths for n in docs)
    assert sum(plan.server_loads) == total == sum(t.cost for t in plan.tasks)
    # The tasks still cover every query token of every worker exactly once.
    for worker, docs in enumerate(lengths):
        covered = sorted(i for t in plan.tasks if t.task.worker == worker for i in range(t.task.q_start, t.task.q_end))
        assert covered == list(range(sum(docs)))


def test_window_and_noncausal_plans_balance_too():
    lengths = skewed_lengths(4, 16384, seed=1)
    for causal, window in ((True, 1024), (False, None)):
        plan = plan_from_lengths(lengths, SHAPE, causal=causal, window=window)
        assert plan.imbalance <= 1.05
        want = sum(task_cost(t, causal, window) for w, docs in enumerate(lengths)
                   for t in make_tasks(docs, w, causal, window, None))
        assert sum(plan.server_loads) == want


def test_plan_is_deterministic_and_independent_of_input_order():
    lengths = skewed_lengths(6, 8192, seed=2, long_docs=((3, 0.8),))
    tasks = [t for w, docs in enumerate(lengths) for t in make_tasks(docs, w, chunk_tokens=None)]
    plan = schedule(tasks, 6, SHAPE)
    shuffled = tasks[:]
    random.Random(0).shuffle(shuffled)
    again = schedule(shuffled, 6, SHAPE)
    assert again == plan  # every field: tasks, ids, servers, loads, bytes
    assert [t.task_id for t in plan.tasks] == list(range(len(plan.tasks)))
    assert [t.task for t in plan.tasks] == sorted(t.task for t in plan.tasks)


def test_bytes_moved_colocated_and_dedicated():
    lengths = [[300, 40], [300, 40], [300, 40]]  # identical workers: nothing needs to move
    plan = plan_from_lengths(lengths, SHAPE)
    assert plan.imbalance == 1.0 and plan.bytes_moved == 0
    assert all(t.server == t.task.worker for t in plan.tasks)

    dedicated = plan_from_lengths(lengths, SHAPE, mode="dedicated", num_servers=2)
    assert dedicated.server_ranks == (3, 4)
    per_task = [SHAPE.task_bytes(t.task) for t in dedicated.tasks]
    assert dedicated.bytes_moved == sum(sum(b.values()) for b in per_task)  # every byte moves
    assert sum(dedicated.bytes_sent) == sum(dedicated.bytes_received)
    q_kv = sum(b["q"] + b["k"] + b["v"] for b in per_task)
    assert sum(dedicated.bytes_sent[:3]) == q_kv and sum(dedicated.bytes_received[3:]) == q_kv
    one = dedicated.tasks[0].task
    assert SHAPE.task_bytes(one) == {"q": one.q_len * 64, "k": one.kv_len * 32, "v": one.kv_len * 32,
                                     "out": one.q_len * 64, "lse": one.q_len * 16}

    skewed = plan_from_lengths(skewed_lengths(4, 8192, seed=3), SHAPE)
    moved = [t for t in skewed.tasks if t.server != t.task.worker]
    assert skewed.bytes_moved == sum(sum(SHAPE.task_bytes(t.task).values()) for t in moved)


def test_without_split_tasks_stay_whole():
    lengths = skewed_lengths(4, 8192, seed=4)
    plan = plan_from_lengths(lengths, SHAPE, split=False)
    assert len(plan.tasks) == sum(len(docs) for docs in lengths)
    assert plan.imbalance > 1.05  # one 7k-token document outweighs the mean: splitting is what balances


def test_bad_arguments():
    tasks = make_tasks([10], 0)
    with pytest.raises(ValueError, match="dedicated"):
        schedule(tasks, 1, SHAPE, num_servers=3)
    with pytest.raises(ValueError, match="num_servers"):
        schedule(tasks, 1, SHAPE, mode="dedicated")
    with pytest.raises(ValueError, match="mode"):
        schedule(tasks, 1, SHAPE, mode="ring")
    with pytest.raises(ValueError, match="workers"):
        schedule(tasks, 0, SHAPE, mode="dedicated", num_servers=1)
