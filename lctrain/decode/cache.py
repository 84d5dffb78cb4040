"""A KV cache sharded along the sequence across the context-parallel ranks.

Each rank keeps, per layer, the post-RoPE K and V of *its* tokens only, plus
their global coordinates (``token_pos``: index in the packed sequence,
``doc_ids``: document id), which are the same for every layer and stored once.

Prefill fills the cache with this rank's layout shard of the prompt: the tokens
of the document being continued (the prompt's last document); padding and
earlier packed documents are dropped, since the decoded tokens can never attend
them.

Append policy (documented contract, tested): the K/V of every decoded token go
to the **emptiest rank** -- the group rank holding the fewest cached tokens at
that moment, ties broken by the lowest group rank. Every rank knows every
rank's count (the prompt is replicated and the policy is deterministic), so all
ranks agree on the owner without communicating. Shard lengths therefore never
differ by more than one token after the first few appends, and with an evenly
dealt prompt the policy is round-robin starting at group rank 0.
"""

from __future__ import annotations

import torch

from lctrain_kernels.mask import PAD_DOC, Coords


class ShardedKVCache:
    """Per-layer K/V (1, n, h_kv, d) of this rank's cached tokens and their coordinates.

    ``lengths[r]``: cached tokens of group rank r (identical on every rank).
    ``owners``: the group rank that received each decoded token, in order.
    """

    def __init__(self, num_layers: int, rank: int, lengths: list[int], keep: torch.Tensor,
                 reserve: int = 0):
        """``keep``: bool mask over this rank's prefill shard of the tokens to cache;
        ``lengths``: per-rank counts of kept prompt tokens; ``reserve``: extra slots
        allocated up front for appends (the buffers grow by doubling past it)."""
        assert lengths[rank] == int(keep.sum())
        self.rank, self.lengths, self.keep = rank, list(lengths), keep
        self.prompt_lengths = tuple(lengths)
        self.size = lengths[rank]
        self.reserve = reserve
        self.owners: list[int] = []
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self.pos = self.doc = None
        self._owner = None  # owner of the token being decoded (set by begin_token)

    # ------------------------------------------------------------ prefill
    def set_prompt_coords(self, pos: torch.Tensor, doc: torch.Tensor) -> None:
        """Global coordinates (s_local,) of this rank's prefill shard (before ``keep``)."""
        capacity = self.size + self.reserve
        self.pos = torch.empty(capacity, dtype=torch.long, device=pos.device)
        self.doc = torch.empty_like(self.pos)
        self.pos[: self.size], self.doc[: self.size] = pos[self.keep], doc[self.keep]

    def store_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """This layer's post-RoPE K/V of the prefill shard, (1, s_local, h_kv, d)."""
        assert k.shape[0] == 1, "the decode cache holds one sequence (batch 1)"
        capacity = self.size + self.reserve
        for store, x in ((self._k, k), (self._v, v)):
            buf = x.new_empty((1, capacity, *x.shape[2:]))
            buf[:, : self.size] = x[:, self.keep]
            store[layer] = buf

    # ------------------------------------------------------------- decode
    def next_owner(self) -> int:
        """Group rank that caches the next decoded token: the emptiest, lowest rank on ties."""
        return min(range(len(self.lengths)), key=lambda r: (self.lengths[r], r))

    def begin_token(self, pos: int, doc: int) -> int:
        """Decide and record the owner of a new token at global ``pos`` in ``doc``;
        the owner stores its coordinates (its K/V follow layer by layer in ``append``)."""
        owner = self.next_owner()
        self.owners.append(owner)
        self.lengths[owner] += 1
        self._owner = owner
        if owner == self.rank:
            self._grow(self.size + 1)
            self.pos[self.size], self.doc[self.size] = pos, doc
            self.size += 1
        return owner

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The new token's K/V (1, 1, h_kv, d) of ``layer``; kept only on its owner."""
        if self._owner != self.rank:
            return
        if self._k[layer].shape[1] < self.size:
            for store in (self._k, self._v):
                old = store[layer]
                store[layer] = torch.cat([old, old.new_empty((1, max(self.size, 2 * old.shape[1]) - old.shape[1],
                                                              *old.shape[2:]))], dim=1)
        self._k[layer][:, self.size - 1] = k[:, 0]
        self._v[layer][:, self.size - 1] = v[:, 0]

    def view(self, layer: int):
        """(k, v, coords) of this rank's cached tokens for ``layer``: (1, n, h_kv, d) and Coords (n,)."""
        n = self.size
        return self._k[layer][:, :n], self._v[layer][:, :n], Coords(self.pos[:n], self.doc[:n])

    def _grow(self, needed: int) -> None:
        if self.pos.shape[0] >= needed:
            return
        extra = max(needed, 2 * self.pos.shape[0]) - self.pos.shape[0]
        self.pos = torch.cat([self.pos, self.pos.new_empty(extra)])
        self.doc = torch.cat([self.doc, self.doc.new_empty(extra)])


def prompt_keep_masks(doc_full: torch.Tensor, layout, num_ranks: int, keep_doc: int):
    """Per-rank (keep mask over its shard, kept count) for a padded prompt's doc ids (L_pad,).

    Only tokens of ``keep_doc`` are cached; padding (doc -1) never is.
    """
    assert keep_doc != PAD_DOC
    masks = []
    for r in range(num_ranks):
        shard = doc_full if layout is None else layout.shard(doc_full, r, dim=0)
        masks.append(shard == keep_doc)
    return masks, [int(m.sum()) for m in masks]
