"""Per-rank work and traffic counters that every strategy updates.

Balance (max/mean over ranks of `pairs`) and volume (`bytes_sent`) are the
figures that compare layouts and strategies without a GPU, so tests and
benchmarks read them from here rather than from timers.

One convention for every strategy:

- ``messages_sent``: communication operations this rank issues, each a
  latency step: one batched point-to-point transfer to a peer (a ring hop
  carrying a payload plus its coordinates) or one collective call (all-gather,
  all-to-all, reduce-scatter, all-reduce). Ring's P - 1 hops and Ulysses'
  four collectives are thus comparable as sequential steps.
- ``bytes_sent``: payload bytes leaving this rank (for a collective, what this
  rank contributes to the other ranks, e.g. (P - 1) rows of an all-to-all).
- ``pairs``: unmasked (query, key) token pairs, summed over batch rows; head
  sharded strategies (Ulysses, usp) report this rank's share of the heads so
  the ranks' sum is the sequence's visible pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lctrain_kernels.mask import as_batched, visible_mask


@dataclass
class AttentionCounters:
    """Accumulated over calls until `reset()`; forward and backward kept apart."""

    pairs: int = 0  # unmasked (query, key) token pairs computed, summed over batch rows
    bytes_sent: int = 0  # payload bytes this rank sent (point-to-point or its share of a collective)
    messages_sent: int = 0  # point-to-point sends / collective calls issued by this rank
    per_phase: dict = field(default_factory=dict)

    def add(self, phase: str, pairs: int = 0, bytes_sent: int = 0, messages: int = 0) -> None:
        self.pairs += pairs
        self.bytes_sent += bytes_sent
        self.messages_sent += messages
        entry = self.per_phase.setdefault(phase, {"pairs": 0, "bytes_sent": 0, "messages_sent": 0})
        entry["pairs"] += pairs
        entry["bytes_sent"] += bytes_sent
        entry["messages_sent"] += messages

    def reset(self) -> None:
        self.pairs = self.bytes_sent = self.messages_sent = 0
        self.per_phase = {}


def count_visible_pairs(q_pos, k_pos, q_doc, k_doc, causal: bool, window, chunk: int = 2048) -> int:
    """Number of unmasked (query, key) pairs, in query chunks so memory stays bounded."""
    q_pos, q_doc = as_batched(q_pos), as_batched(q_doc)
    total = 0
    for start in range(0, q_pos.shape[-1], chunk):
        mask = visible_mask(q_pos[:, start:start + chunk], k_pos, q_doc[:, start:start + chunk], k_doc,
                            causal, window)
        total += int(mask.sum())
    return total


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
