"""The attention mask rule, stated once, in global token coordinates.

Query i may attend key j iff ``doc[i] == doc[j] != PAD_DOC`` and, when causal,
``pos[j] <= pos[i]``, and, with a window ``w``, ``pos[i] - pos[j] < w``
(``|pos[i] - pos[j]| < w`` when not causal).

Kernels receive the coordinates of the query block and of the key block
separately, because distributed strategies hand them arbitrary blocks (striped,
zigzag, ...). The range tests below let a blockwise kernel skip whole tiles
without building their mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_DOC = -1  # document id of padding tokens: they attend nothing and nothing attends them


def as_batched(coord: torch.Tensor) -> torch.Tensor:
    """(s,) or (b, s) coordinates -> (1 or b, s), so they broadcast over a batch."""
    assert coord.dim() in (1, 2), f"coordinates must be (s,) or (b, s), got {tuple(coord.shape)}"
    return coord.unsqueeze(0) if coord.dim() == 1 else coord


def visible_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_doc: torch.Tensor,
    k_doc: torch.Tensor,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """Boolean (1 or b, sq, sk) mask: True where the query may attend the key."""
    q_pos, q_doc = as_batched(q_pos)[:, :, None], as_batched(q_doc)[:, :, None]
    k_pos, k_doc = as_batched(k_pos)[:, None, :], as_batched(k_doc)[:, None, :]
    visible = (q_doc == k_doc) & (q_doc != PAD_DOC)
    distance = q_pos - k_pos  # query minus key: >= 0 for keys in the past
    if causal:
        visible = visible & (distance >= 0)
    if window is not None:
        visible = visible & ((distance if causal else distance.abs()) < window)
    return visible


@dataclass(frozen=True)
class CoordRange:
    """Bounds of the coordinates inside one tile (over the whole batch)."""

    pos_min: int
    pos_max: int
    doc_min: int
    doc_max: int


def tile_ranges(pos: torch.Tensor, doc: torch.Tensor, block: int) -> list[CoordRange]:
    """Coordinate bounds of each consecutive tile of ``block`` tokens.

    One host transfer for all tiles: the last tile is padded by repeating its
    final token, which leaves its bounds unchanged.
    """
    pos, doc = as_batched(pos), as_batched(doc)
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


def tile_may_be_visible(q: CoordRange, k: CoordRange, causal: bool, window: int | None) -> bool:
    """False when the ranges alone prove every (query, key) pair of the tile masked."""
    if q.doc_max == PAD_DOC or k.doc_max == PAD_DOC:  # PAD_DOC is below every real id
        return False
    if q.doc_max < k.doc_min or k.doc_max < q.doc_min:
        return False
    if causal and k.pos_min > q.pos_max:
        return False
    if window is not None:
        if q.pos_min - k.pos_max >= window:
            return False
        if not causal and k.pos_min - q.pos_max >= window:
            return False
    return True


def tile_fully_visible(q: CoordRange, k: CoordRange, causal: bool, window: int | None) -> bool:
    """True when the ranges alone prove every pair of the tile visible (no mask needed)."""
    one_doc = q.doc_min == q.doc_max == k.doc_min == k.doc_max != PAD_DOC
    if not one_doc:
        return False
    if causal and k.pos_max > q.pos_min:
        return False
    if window is not None:
        if q.pos_max - k.pos_min >= window:
            return False
        if not causal and k.pos_max - q.pos_min >= window:
            return False
    return True
