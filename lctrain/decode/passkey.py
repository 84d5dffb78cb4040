"""Passkey retrieval through distributed greedy decoding (not teacher forcing).

For each eval sample the prompt is the packed sequence up to the last answer
span (the last question of the last document, so the needle lies up to a whole
sequence back); the model then decodes ``key_digits`` tokens greedily with
``generate`` and they are compared with the key. Exact = every digit right.
"""

from __future__ import annotations

import time

import torch

from lctrain.data.loader import EVAL_INDEX_OFFSET

from .session import generate


def last_answer_span(answer_mask: torch.Tensor) -> tuple[int, int]:
    """(first, last) label index of the last run of True in ``answer_mask``."""
    index = answer_mask.nonzero().flatten().tolist()
    if not index:
        raise ValueError("the sample has no answer tokens (answer_mask is all False); use the passkey dataset")
    members = set(index)
    last = first = index[-1]
    while first - 1 in members:
        first -= 1
    return first, last


def passkey_decode_eval(model, dataset, num_samples: int, cp_group=None, layout="striped",
                        decode: str = "tree", prefill_strategy: str = "tree", dp_rank: int = 0,
                        dp_size: int = 1, start_index: int = EVAL_INDEX_OFFSET,
                        ring_finish: str = "broadcast", kernel: str = "torch") -> dict:
    """Exact-key and per-digit accuracy of greedily decoded passkey answers.

    Samples ``start_index + i`` for i in range(num_samples) (the trainer's held-out
    eval indices by default) with ``i % dp_size == dp_rank`` are decoded by this
    cp group (``cp_group`` / ``layout`` / ``prefill_strategy`` / ``decode`` / ``kernel`` as in
    ``generate``). Returns this dp rank's counts (``num_samples``, ``num_exact``,
    ``num_digits``, ``num_right``: every cp rank of a group reports the same, so
    sum over the world and divide by cp size to aggregate), the rates
    ``passkey_decode/exact`` and ``passkey_decode/digit_acc`` over them, the
    decode counters per token and the wall time.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    counts = {"num_samples": 0, "num_exact": 0, "num_digits": 0, "num_right": 0}
    per_token = []
    start = time.perf_counter()
    for i in range(dp_rank, num_samples, dp_size):
        sample = dataset.sample(start_index + i)
        first, last = last_answer_span(sample["answer_mask"])
        expected = sample["labels"][first:last + 1]
        sessions: list = []
        got = generate(model, sample["input_ids"][:first + 1], len(expected), cp_group, layout,
                       prefill_strategy, decode, position_ids=sample["position_ids"][:first + 1],
                       doc_ids=sample["doc_ids"][:first + 1], ring_finish=ring_finish, session_out=sessions,
                       kernel=kernel)
        right = int((got == expected).sum())
        counts["num_samples"] += 1
        counts["num_digits"] += len(expected)
        counts["num_right"] += right
        counts["num_exact"] += int(right == len(expected))
        if sessions[0].counters.tokens:
            per_token.append(sessions[0].counters.per_token())
    n = max(counts["num_samples"], 1)
    result = {
        "passkey_decode/exact": counts["num_exact"] / n,
        "passkey_decode/digit_acc": counts["num_right"] / max(counts["num_digits"], 1),
        **counts, "decode": decode, "prefill_strategy": prefill_strategy,
        "layout": layout if isinstance(layout, str) else layout.name, "wall_s": time.perf_counter() - start,
    }
    for key in ("collectives", "hops", "latency_steps", "bytes_sent"):
        values = [p[key] for p in per_token]
        result[f"{key}_per_token"] = sum(values) / len(values) if values else 0.0
    return result
