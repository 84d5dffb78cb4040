"""Tasks of the attention servers: exact costs (against the project's mask rule), chunking, cutting."""

import random

import pytest
import torch

from lctrain.attention.counters import count_visible_pairs
from lctrain.disagg.tasks import AttentionTask, cut_to_cost, make_task, make_tasks, task_cost, visible_pairs_in_ranges
from lctrain_kernels.mask import Coords, Mask

WINDOWS = [None, 1, 2, 5, 17]


def counted(q_start, q_len, kv_start, kv_len, causal, window):
    """count_visible_pairs on the same coordinates, one document."""
    q_pos, k_pos = torch.arange(q_start, q_start + q_len), torch.arange(kv_start, kv_start + kv_len)
    return count_visible_pairs(Coords(q_pos, torch.zeros_like(q_pos)), Coords(k_pos, torch.zeros_like(k_pos)),
                               Mask(causal, window))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", WINDOWS)
def test_cost_equals_count_visible_pairs_on_any_ranges(causal, window):
    rng = random.Random(hash((causal, window)) % 1000)
    for _ in range(150):  # arbitrary ranges, not only those make_task picks
        q_start, kv_start = rng.randint(0, 40), rng.randint(0, 40)
        q_len, kv_len = rng.randint(0, 30), rng.randint(0, 30)
        assert visible_pairs_in_ranges(q_start, q_len, kv_start, kv_len, causal, window) == \
            counted(q_start, q_len, kv_start, kv_len, causal, window)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", WINDOWS)
def test_task_key_range_holds_every_visible_key(causal, window):
    """Cost over the task's kv range == cost over the whole document: no visible key left out."""
    rng = random.Random(7)
    for _ in range(100):
        doc_start, doc_len = rng.randint(0, 9), rng.randint(1, 50)
        q_start = doc_start + rng.randint(0, doc_len - 1)
        q_len = rng.randint(1, doc_start + doc_len - q_start)
        task = make_task(0, 0, doc_start, doc_len, q_start, q_len, causal, window)
        assert task_cost(task, causal, window) == counted(q_start, q_len, doc_start, doc_len, causal, window)
        if window is not None:
            assert task.kv_len <= window - 1 + q_len + (0 if causal else window - 1)


def test_causal_closed_form_and_key_ranges():
    task = make_task(0, 0, doc_start=10, doc_len=100, q_start=50, q_len=20, causal=True, window=None)
    assert (task.kv_start, task.kv_len) == (10, 60)  # the document prefix up to the chunk end
    assert task_cost(task, True, None) == 20 * 60 - 20 * 19 // 2
    windowed = make_task(0, 0, 10, 100, 50, 20, causal=True, window=8)
    assert (windowed.kv_start, windowed.kv_len) == (43, 27)  # last w - 1 + q_len keys
    whole = make_task(0, 0, 10, 100, 50, 20, causal=False, window=None)
    assert (whole.kv_start, whole.kv_len) == (10, 100)


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 6), (False, 6)])
def test_make_tasks_partitions_queries_and_costs_sum_to_the_packed_sequence(causal, window):
    lengths, num_pad = [3, 40, 9, 130, 1, 64], 5
    tasks = make_tasks(lengths, worker=2, causal=causal, window=window, chunk_tokens=16)
    covered = sorted(i for t in tasks for i in range(t.q_start, t.q_end))
    assert covered == list(range(sum(lengths)))
    assert all(t.worker == 2 and t.q_len <= 16 for t in tasks)
    for doc_index, n in enumerate(lengths):
        chunks = [t.q_len for t in tasks if t.doc == doc_index]
        assert chunks == ([n] if n <= 16 else [16] * (n // 16) + ([n % 16] if n % 16 else []))
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((num_pad,), -1)])
    pos = torch.arange(doc.numel())
    assert sum(task_cost(t, causal, window) for t in tasks) == count_visible_pairs(Coords(pos, doc), Coords(pos, doc),
                                                                                   Mask(causal, window))
    whole = make_tasks(lengths, worker=2, causal=causal, window=window, chunk_tokens=None)
    assert [t.q_len for t in whole] == lengths


def test_cut_to_cost_keeps_cost_and_cuts_on_chunk_multiples():
    task = make_task(1, 3, doc_start=100, doc_len=1000, q_start=100, q_len=1000, causal=True, window=None)
    budget = task_cost(task, True, None) // 7
    for from_end in (False, True):
        piece, rest = cut_to_cost(task, budget, True, None, from_end, min_chunk_tokens=64)
        assert task_cost(piece, True, None) <= budget
        assert task_cost(piece, True, None) + task_cost(rest, True, None) == task_cost(task, True, None)
        assert piece.q_len + rest.q_len == 1000 and (piece.q_start - 100) % 64 == 0 == (rest.q_start - 100) % 64
        assert (rest.q_end if from_end else piece.q_end) == (piece.q_start if from_end else rest.q_start)
        assert all(p.kv_start == 100 and p.kv_end == p.q_end for p in (piece, rest))  # causal prefix each
    longest, _ = cut_to_cost(task, budget, True, None, min_chunk_tokens=64)
    grown = make_task(1, 3, 100, 1000, 100, longest.q_len + 64, True, None)
    assert task_cost(grown, True, None) > budget  # the longest prefix that fits
    tiny = make_task(0, 0, 0, 64, 0, 64, True, None)
    assert cut_to_cost(tiny, 1, True, None, min_chunk_tokens=64) == (None, tiny)


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk_tokens"):
        make_tasks([4], 0, chunk_tokens=0)
    with pytest.raises(ValueError, match="length"):
        make_tasks([4, 0], 0)
    assert AttentionTask(0, 0, 0, 4, 0, 4, 0, 4).q_end == 4
