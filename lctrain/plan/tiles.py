"""Attention work as the local kernels do it: in tiles, not pairs.

A blockwise kernel (the Triton kernel on a GPU, ``torch_blockwise`` on a CPU) walks every
(query tile, key tile) of a call, skips a tile when its coordinate ranges prove it fully masked,
runs a fully visible tile without mask arithmetic, and computes a partly visible tile whole and
then masks it. So a call costs its visited tiles, and a partly masked tile costs a full tile's
matmuls plus its mask (``partial_cost`` full tiles). Visible pairs undercount that: a striped or
ring block pays a diagonal of partial tiles at every ring step, while a contiguous layout's
off-diagonal blocks are all full tiles. The rules here are the kernels' own
(``lctrain_kernels.mask.tile_may_be_visible`` / ``tile_fully_visible``), vectorised over tiles.
"""

from __future__ import annotations

import numpy as np

from lctrain.attention.layouts import Layout
from lctrain_kernels.mask import PAD_DOC, Mask


def tile_bounds(pos: np.ndarray, doc: np.ndarray, block: int) -> tuple[np.ndarray, ...]:
    """(pos_min, pos_max, doc_min, doc_max) of each run of ``block`` consecutive tokens (the
    last tile may be short), as ``tile_ranges`` computes them for a kernel call."""
    starts = np.arange(0, pos.shape[0], block)
    return (np.minimum.reduceat(pos, starts), np.maximum.reduceat(pos, starts),
            np.minimum.reduceat(doc, starts), np.maximum.reduceat(doc, starts))


def tile_counts(q: tuple[np.ndarray, np.ndarray], k: tuple[np.ndarray, np.ndarray], mask: Mask,
                block_q: int, block_k: int) -> tuple[int, int]:
    """(fully visible tiles, partly visible tiles) of a kernel call of queries ``q`` = (positions,
    doc ids) against keys ``k``, tiled in the order given."""
    return _counts(tile_bounds(*q, block_q), tile_bounds(*k, block_k), mask)


def _counts(q_bounds, k_bounds, mask: Mask) -> tuple[int, int]:
    qp0, qp1, qd0, qd1 = (x[:, None] for x in q_bounds)
    kp0, kp1, kd0, kd1 = (x[None, :] for x in k_bounds)
    may = (qd1 != PAD_DOC) & (kd1 != PAD_DOC) & (qd1 >= kd0) & (kd1 >= qd0)
    full = (qd0 == qd1) & (kd0 == kd1) & (qd0 == kd0) & (qd0 != PAD_DOC)
    if mask.causal:
        may &= kp0 <= qp1
        full &= kp1 <= qp0
    if mask.window is not None:
        may &= qp0 - kp1 < mask.window
        full &= qp1 - kp0 < mask.window
        if not mask.causal:
            may &= kp0 - qp1 < mask.window
            full &= kp1 - qp0 < mask.window
    full &= may
    return int(full.sum()), int((may & ~full).sum())


def tile_count_matrices(layout: Layout, doc: np.ndarray, mask: Mask, block_q: int,
                        block_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(F[r, j], P[r, j]): fully and partly visible tiles of rank r's queries against rank j's keys.

    Every strategy's calls are made of these blocks (a ring step is one, Ulysses and all-gather
    concatenate shards whole), exactly when a shard's length is a multiple of the blocks."""
    seq_len, cp = doc.shape[0], layout.cp_size
    shards = [layout.positions(seq_len, r).numpy() for r in range(cp)]
    q_bounds = [tile_bounds(pos, doc[pos], block_q) for pos in shards]
    k_bounds = q_bounds if block_k == block_q else [tile_bounds(pos, doc[pos], block_k) for pos in shards]
    counts = np.array([[_counts(q_bounds[r], k_bounds[j], mask) for j in range(cp)] for r in range(cp)])
    return counts[..., 0], counts[..., 1]


def tile_work_matrix(layout: Layout, doc: np.ndarray, mask: Mask, block_q: int, block_k: int,
                     partial_cost: float) -> np.ndarray:
    """T[r, j]: the pair-equivalent work of rank r's queries against rank j's keys, tile by tile:
    (full tiles + ``partial_cost`` x partial tiles) x block_q x block_k. The counterpart of
    ``balance.work_matrix`` for time (it counts what the kernel computes, not what it keeps)."""
    full, partial = tile_count_matrices(layout, doc, mask, block_q, block_k)
    return (full + partial_cost * partial) * float(block_q * block_k)
