"""Input checks shared by the attention strategies.

Every check is local and rank-symmetric (each rank raises the same
ValueError), so a mistake fails before any collective can hang.
"""

from __future__ import annotations

import torch

from lctrain_kernels.mask import Coords


def check_qkv(q, k, v, seq_word: str = "sequence length") -> None:
    """Shapes, GQA head ratio and dtypes of one attention call."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, {seq_word} and head_dim: "
            f"attention here takes the same tokens for q, k and v"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"q has {q.shape[2]} heads and k/v have {k.shape[2]}: the number of query heads must "
            f"be a multiple of the number of K/V heads (GQA)"
        )
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_coords(coords: Coords, batch: int, seq_len: int) -> None:
    """Per-token coordinates: (seq,) or (batch, seq) integer tensors."""
    if not isinstance(coords, Coords):
        raise ValueError(f"coordinates must be a Coords(token_pos, doc_ids), got {type(coords).__name__}")
    for name, coord in zip(Coords._fields, coords):
        if not isinstance(coord, torch.Tensor) or coord.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor of global coordinates (layout.positions)")
        if tuple(coord.shape) not in ((seq_len,), (batch, seq_len)):
            raise ValueError(
                f"{name} must have shape ({seq_len},) or ({batch}, {seq_len}) to match q, "
                f"got {tuple(coord.shape)}"
            )


def check_shard_inputs(q, k, v, coords: Coords) -> None:
    """A context-parallel call on this rank's shard; raises before any collective is issued."""
    check_qkv(q, k, v, seq_word="local sequence length")
    check_coords(coords, q.shape[0], q.shape[1])


def shard_coords(q, coords: Coords) -> Coords:
    """Coordinates as the strategies send them: long, on q's device, both (1 or b, s_local)
    of one shape (one is per batch row: both travel as (b, s_local)), contiguous."""
    return coords.to(q.device).batched()
