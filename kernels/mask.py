"""The attention mask rule, stated once, in global token coordinates.

Query i may attend key j iff ``doc[i] == doc[j] != PAD_DOC`` and, when causal,
``pos[j] <= pos[i]``, and, with a window ``w``, ``pos[i] - pos[j] < w``
(``|pos[i] - pos[j]| < w`` when not causal).

Two small values carry the rule through every kernel and strategy:

- ``Coords(token_pos, doc_ids)``: the global coordinates of a block of tokens,
  ``token_pos`` the index in the full packed sequence (what layouts shard),
  ``doc_ids`` the document of each token (``PAD_DOC`` for padding);
- ``Mask(causal, window)``: which of the same-document pairs are visible.

Kernels receive the coordinates of the query block and of the key block
separately, because distributed strategies hand them arbitrary blocks (striped,
zigzag, ...). The range tests below let a blockwise kernel skip whole tiles
without building their mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

PAD_DOC = -1  # document id of padding tokens: they attend nothing and nothing attends them


def as_batched(coord: torch.Tensor) -> torch.Tensor:
    """(s,) or (b, s) coordinates -> (1 or b, s), so they broadcast over a batch."""
    assert coord.dim() in (1, 2), f"coordinates must be (s,) or (b, s), got {tuple(coord.shape)}"
    return coord.unsqueeze(0) if coord.dim() == 1 else coord


class Coords(NamedTuple):
    """Global coordinates of a block of tokens: two integer tensors of shape (s,) or (b, s)."""

    token_pos: torch.Tensor  # index of each token in the full packed sequence
    doc_ids: torch.Tensor  # document of each token; PAD_DOC for padding

    @classmethod
    def of_sequence(cls, seq_len: int, device=None) -> Coords:
        """Tokens 0..seq_len-1 of one document."""
        return cls(torch.arange(seq_len, device=device), torch.zeros(seq_len, dtype=torch.long, device=device))

    @property
    def seq_len(self) -> int:
        return self.token_pos.shape[-1]

    def to(self, device) -> Coords:
        return Coords(self.token_pos.to(device), self.doc_ids.to(device))

    def batched(self) -> Coords:
        """Both (rows, s) int64 and of one shape (1 row when the batch shares them), contiguous."""
        pos, doc = torch.broadcast_tensors(as_batched(self.token_pos).long(), as_batched(self.doc_ids).long())
        return Coords(pos.contiguous(), doc.contiguous())

    def stacked(self) -> torch.Tensor:
        """(2, rows, s) int64: one tensor to send or gather."""
        return torch.stack(self.batched())

    @classmethod
    def unstack(cls, stacked: torch.Tensor) -> Coords:
        return cls(stacked[0], stacked[1])

    def narrow(self, start: int, end: int) -> Coords:
        return Coords(self.token_pos[..., start:end], self.doc_ids[..., start:end])


@dataclass(frozen=True)
class Mask:
    """Which same-document (query, key) pairs are visible: causal and/or a sliding window."""

    causal: bool = True
    window: int | None = None  # tokens; None: no window

    def __post_init__(self):
        if self.window is not None and (isinstance(self.window, bool) or self.window < 1):
            raise ValueError(f"window must be a positive number of tokens or None, got {self.window!r}")


CAUSAL = Mask(causal=True)


def visible_mask(q: Coords, k: Coords, mask: Mask = CAUSAL) -> torch.Tensor:
    """Boolean (1 or b, sq, sk) mask: True where the query may attend the key."""
    q_pos, q_doc = as_batched(q.token_pos)[:, :, None], as_batched(q.doc_ids)[:, :, None]
    k_pos, k_doc = as_batched(k.token_pos)[:, None, :], as_batched(k.doc_ids)[:, None, :]
    visible = (q_doc == k_doc) & (q_doc != PAD_DOC)
    distance = q_pos - k_pos  # query minus key: >= 0 for keys in the past
    if mask.causal:
        visible = visible & (distance >= 0)
    if mask.window is not None:
        visible = visible & ((distance if mask.causal else distance.abs()) < mask.window)
    return visible


_POS_BITS = 40  # (doc, pos) packed into one int64 key: doc * 2**40 + pos + 2**39
_POS_OFFSET = 1 << (_POS_BITS - 1)


def count_visible_pairs(q: Coords, k: Coords, mask: Mask = CAUSAL) -> torch.Tensor:
    """Unmasked (query, key) pairs summed over coordinate rows, as a 0-dim int64 tensor on the
    coordinates' device (no host sync). Keys are sorted by (doc, pos) once, then each query's
    visible keys are one interval of them: O((sq + sk) log sk), never an sq x sk mask."""
    rows = max(as_batched(q.token_pos).shape[0], as_batched(k.token_pos).shape[0])
    qb, kb = q.batched(), k.batched()
    q_pos, q_doc = (x.expand(rows, -1) for x in qb)
    k_pos, k_doc = (x.expand(rows, -1) for x in kb)
    key_of = lambda doc, pos: (doc << _POS_BITS) + (pos + _POS_OFFSET).clamp(0, (1 << _POS_BITS) - 1)  # noqa: E731
    # Padding keys sort after every real key (doc -1 would sort first and look like a document).
    k_keys = torch.where(k_doc == PAD_DOC, torch.iinfo(torch.int64).max, key_of(k_doc, k_pos))
    k_keys = k_keys.sort(dim=1).values.contiguous()
    far = 1 << (_POS_BITS - 2)
    lower = q_pos - (mask.window - 1) if mask.window is not None else q_pos - far
    if mask.causal:
        upper = q_pos
    else:
        upper = q_pos + (mask.window - 1) if mask.window is not None else q_pos + far
    low = torch.searchsorted(k_keys, key_of(q_doc, lower).contiguous(), right=False)
    high = torch.searchsorted(k_keys, key_of(q_doc, upper).contiguous(), right=True)
    return torch.where(q_doc == PAD_DOC, 0, high - low).sum()


@dataclass(frozen=True)
class CoordRange:
    """Bounds of the coordinates inside one tile (over the whole batch)."""

    pos_min: int
    pos_max: int
    doc_min: int
    doc_max: int


def tile_ranges(coords: Coords, block: int) -> list[CoordRange]:
    """Coordinate bounds of each consecutive tile of ``block`` tokens.

    One host transfer for all tiles: the last tile is padded by repeating its
    final token, which leaves its bounds unchanged.
    """
    pos, doc = as_batched(coords.token_pos), as_batched(coords.doc_ids)
    seq_len = pos.shape[-1]
    if seq_len == 0:
        return []
    num_tiles = -(-seq_len // block)
    pad = num_tiles * block - seq_len

    def bounds(coord: torch.Tensor) -> tuple[list[int], list[int]]:
        padded = torch.cat([coord, coord[:, -1:].expand(-1, pad)], dim=1)
        tiles = padded.reshape(coord.shape[0], num_tiles, block)
        return tiles.amin(dim=(0, 2)).tolist(), tiles.amax(dim=(0, 2)).tolist()

    (pos_min, pos_max), (doc_min, doc_max) = bounds(pos), bounds(doc)
    return [CoordRange(*r) for r in zip(pos_min, pos_max, doc_min, doc_max)]


def tile_may_be_visible(q: CoordRange, k: CoordRange, mask: Mask) -> bool:
    """False when the ranges alone prove every (query, key) pair of the tile masked."""
    if q.doc_max == PAD_DOC or k.doc_max == PAD_DOC:  # PAD_DOC is below every real id
        return False
    if q.doc_max < k.doc_min or k.doc_max < q.doc_min:
        return False
    if mask.causal and k.pos_min > q.pos_max:
        return False
    if mask.window is not None:
        if q.pos_min - k.pos_max >= mask.window:
            return False
        if not mask.causal and k.pos_min - q.pos_max >= mask.window:
            return False
    return True


def tile_fully_visible(q: CoordRange, k: CoordRange, mask: Mask) -> bool:
    """True when the ranges alone prove every pair of the tile visible (no mask needed)."""
    one_doc = q.doc_min == q.doc_max == k.doc_min == k.doc_max != PAD_DOC
    if not one_doc:
        return False
    if mask.causal and k.pos_max > q.pos_min:
        return False
    if mask.window is not None:
        if q.pos_max - k.pos_min >= mask.window:
            return False
        if not mask.causal and k.pos_max - q.pos_min >= mask.window:
            return False
    return True
