"""Exact single-device attention on full sequences (public reference)."""

from __future__ import annotations

import torch

from lctrain_kernels.mask import Coords, Mask
from lctrain_kernels.reference import dense_attention


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of full (batch, seq, heads, head_dim) tensors.

    Token t has position t; ``doc_ids`` is (seq,) or (batch, seq), None meaning
    one document, and -1 marking padding. Returns out (b, s, h, d) and lse
    (b, h, s) in float32 (float64 for float64 inputs). Materialises the full
    score matrix: for tests and small shapes.
    """
    seq_len = q.shape[1]
    if k.shape[1] != seq_len:
        raise ValueError(
            f"reference_attention works on full sequences: q has {seq_len} tokens but k has "
            f"{k.shape[1]}; pass the same sequence for q, k and v"
        )
    coords = Coords.of_sequence(seq_len, q.device)
    if doc_ids is not None:
        coords = Coords(coords.token_pos, doc_ids.to(q.device))
    return dense_attention(q, k, v, coords, coords, Mask(causal, window), scale)
