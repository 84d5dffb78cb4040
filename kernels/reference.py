"""Exact dense attention: the reference every kernel and strategy is tested against.

Materialises the full (sq, sk) score matrix, so it is for tests and small
shapes only. Differentiable by plain autograd, and NaN-free (forward and
backward) for query rows that can see no key.
"""

from __future__ import annotations

import math

import torch

from .mask import CAUSAL, Coords, Mask, visible_mask


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (so tests reach ~1e-12); everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_coords: Coords,
    k_coords: Coords,
    mask: Mask = CAUSAL,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (b, sq, h, d) over k, v (b, sk, h_kv, d) with h % h_kv == 0.

    Returns ``out`` (b, sq, h, d) in q's dtype and ``lse`` (b, h, sq), the
    log-sum-exp of the scaled, masked scores, in float32 (float64 for float64
    inputs). A row that sees no key gets out = 0 and lse = -inf.
    """
    batch, seq_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    acc_dtype = accumulation_dtype(q.dtype)
    scale = default_scale(head_dim, scale)

    # GQA without repeating K/V: query head (kv_head * group + i) reads kv_head.
    q_grouped = q.to(acc_dtype).reshape(batch, seq_q, num_kv_heads, group, head_dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q_grouped, k.to(acc_dtype)) * scale
    visible = visible_mask(q_coords, k_coords, mask)[:, None, None]
    row_visible = visible.any(dim=-1, keepdim=True)

    # Masked scores become -inf; rows with no visible key become all-zero
    # (finite) so logsumexp and its gradient stay finite, then get zeroed.
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = torch.where(row_visible, scores, torch.zeros_like(scores))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.where(row_visible, torch.exp(scores - lse), torch.zeros_like(scores))
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(acc_dtype))

    lse = torch.where(row_visible, lse, torch.full_like(lse, float("-inf")))
    out = out.reshape(batch, seq_q, num_heads, head_dim).to(q.dtype)
    return out, lse.reshape(batch, num_heads, seq_q)
