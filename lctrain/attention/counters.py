"""Per-rank work and traffic counters of the attention strategies (opt-in).

Balance (max/mean over ranks of ``pairs``) and volume (``bytes_sent``) are the
figures that compare layouts and strategies without a GPU, so tests and
benchmarks read them from here rather than from timers. Training leaves them
off (``cp.count=false``): a strategy given ``counters=None`` records nothing.

One convention for every strategy:

- ``messages_sent``: communication operations this rank issues, each a
  latency step: one batched point-to-point transfer to a peer (a ring hop
  carrying a payload plus its coordinates) or one collective call (all-gather,
  all-to-all, reduce-scatter, all-reduce). Ring's P - 1 hops and Ulysses'
  four collectives are thus comparable as sequential steps.
- ``bytes_sent``: payload bytes leaving this rank (for a collective, what this
  rank contributes to the other ranks, see ``lctrain.distributed.comm``).
- ``pairs``: unmasked (query, key) token pairs, summed over batch rows; head
  sharded strategies (Ulysses, usp) report this rank's share of the heads so
  the ranks' sum is the sequence's visible pairs.

Pairs are counted on the device (``count_visible_pairs`` sorts the keys and
binary-searches each query's interval) and read back only when a figure is
asked for, so counting adds no host sync to a step.
"""

from __future__ import annotations

import torch

from lctrain_kernels.mask import Coords, Mask, as_batched, count_visible_pairs

_FIELDS = ("pairs", "bytes_sent", "messages_sent")


class AttentionCounters:
    """Accumulated over calls until ``reset()``; forward and backward kept apart in ``per_phase``."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._totals = {field: 0 for field in _FIELDS}
        self._per_phase: dict[str, dict[str, int]] = {}
        self._pending: list[tuple[str, torch.Tensor]] = []  # device-side pair counts not read yet

    def add(self, phase: str, pairs: int = 0, bytes_sent: int = 0, messages: int = 0) -> None:
        entry = self._per_phase.setdefault(phase, {field: 0 for field in _FIELDS})
        for field, value in zip(_FIELDS, (pairs, bytes_sent, messages)):
            entry[field] += value
            self._totals[field] += value

    def record_comm(self, phase: str, kind: str, bytes_sent: int, collective: bool) -> None:
        """One communication operation (``lctrain.distributed.comm`` calls this)."""
        self.add(phase, bytes_sent=bytes_sent, messages=1)

    def add_pairs(self, phase: str, q: Coords, k: Coords, mask: Mask, batch: int, share=(0, 1)) -> None:
        """Visible pairs of queries ``q`` against keys ``k`` over ``batch`` rows (coordinates may
        be shared by the batch). ``share=(rank, n)``: keep this rank's 1/n of them (an integer
        split whose sum over the n ranks is the total: head-sharded strategies)."""
        rows = max(as_batched(q.token_pos).shape[0], as_batched(k.token_pos).shape[0])
        total = count_visible_pairs(q, k, mask) * (batch // rows)
        rank, n = share
        if n > 1:
            total = total // n + (total % n > rank).long()
        self._pending.append((phase, total))

    def _settle(self) -> None:
        if self._pending:
            values = torch.stack([t.to("cpu", torch.long) for _, t in self._pending]).tolist()
            for (phase, _), value in zip(self._pending, values):
                self.add(phase, pairs=value)
            self._pending = []

    @property
    def pairs(self) -> int:
        self._settle()
        return self._totals["pairs"]

    @property
    def bytes_sent(self) -> int:
        return self._totals["bytes_sent"]

    @property
    def messages_sent(self) -> int:
        return self._totals["messages_sent"]

    @property
    def per_phase(self) -> dict[str, dict[str, int]]:
        self._settle()
        return self._per_phase

    def share_of(self, rank: int, num_ranks: int) -> _PairShare:
        """A view that records this rank's 1/num_ranks share of every pair count (usp's ring
        computes its pairs for 1/U of the heads) and everything else as it is."""
        return _PairShare(self, rank, num_ranks)

    def __repr__(self) -> str:
        return f"AttentionCounters(pairs={self.pairs}, bytes_sent={self.bytes_sent}, messages={self.messages_sent})"


class _PairShare:
    def __init__(self, counters: AttentionCounters, rank: int, num_ranks: int):
        self.counters, self.share = counters, (rank, num_ranks)

    def record_comm(self, phase: str, kind: str, bytes_sent: int, collective: bool) -> None:
        self.counters.record_comm(phase, kind, bytes_sent, collective)

    def add_pairs(self, phase: str, q: Coords, k: Coords, mask: Mask, batch: int, share=(0, 1)) -> None:
        assert share == (0, 1), "a shared view is not shared again"
        self.counters.add_pairs(phase, q, k, mask, batch, self.share)
