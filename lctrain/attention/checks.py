"""Input checks shared by the context-parallel strategies.

Every check is local and rank-symmetric (each rank raises the same
ValueError), so a mistake fails before any collective can hang.
"""

from __future__ import annotations

import torch


def check_shard_inputs(q, k, v, q_pos, q_doc, window) -> None:
    """Raise ValueError, naming the fix, before any collective is issued."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq_local, heads, head_dim), got {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, local sequence length and "
            f"head_dim: context-parallel attention takes this rank's shard of the same tokens for q, k and v"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"q has {q.shape[2]} heads and k/v have {k.shape[2]}: the number of query heads must "
            f"be a multiple of the number of K/V heads (GQA)"
        )
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, seq_local = q.shape[0], q.shape[1]
    for name, coord in (("q_pos", q_pos), ("q_doc", q_doc)):
        if not isinstance(coord, torch.Tensor) or coord.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor of global coordinates (layout.positions)")
        if tuple(coord.shape) not in ((seq_local,), (batch, seq_local)):
            raise ValueError(
                f"{name} must have shape ({seq_local},) or ({batch}, {seq_local}) to match the local "
                f"shard, got {tuple(coord.shape)}"
            )
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of tokens or None, got {window}")
