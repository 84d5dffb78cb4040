"""The Triton attention kernels' public entry points; same contract as ``torch_blockwise``.

``triton_forward`` / ``triton_backward`` are the building blocks a distributed strategy calls per
block (the backward takes the merged lse and delta of all blocks); ``triton_attention`` is the
differentiable single-call entry point, sharing one tile plan between forward and backward.
"""

from __future__ import annotations

import torch

from ..mask import CAUSAL, Coords, Mask
from ..reference import default_scale
from .backward import backward
from .forward import forward
from .launch import check_inputs, interpret_mode, require_triton
from .plan import plan


def triton_forward(q, k, v, q_coords: Coords, k_coords: Coords, mask: Mask = CAUSAL, scale=None,
                   block_q=None, block_k=None, out_dtype=None, tile_plan=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``blockwise_forward``: out (b, sq, h, d) in q's dtype, lse (b, h, sq)
    float32, -inf (and out 0) for rows that see no key. ``block_q``/``block_k`` fix the tiles
    (powers of two >= 16) instead of autotuning; ``out_dtype`` (e.g. float32) keeps a partial
    output unrounded for a later merge. ``tile_plan``: ``plan.plan``'s result for these
    coordinates, to share one plan between a forward and its backward."""
    require_triton()
    check_inputs(q, k, v)
    return forward(q, k, v, q_coords, k_coords, mask, default_scale(q.shape[3], scale), block_q, block_k,
                   out_dtype, tile_plan)


def triton_backward(dout, q, k, v, out, lse, q_coords: Coords, k_coords: Coords, mask: Mask = CAUSAL,
                    scale=None, delta=None, block_q=None, block_k=None, tile_plan=None):
    """Same contract as ``blockwise_backward``: ``lse`` (b, h, sq) may be the merged lse over all
    key blocks; ``delta`` (b, h, sq) = rowsum(dout * out) is computed when None. Returns dq
    (b, sq, h, d), dk and dv (b, sk, h_kv, d) in float32, dk/dv summed over each GQA group."""
    require_triton()
    check_inputs(q, k, v)
    return backward(dout, q, k, v, out, lse, q_coords, k_coords, mask, default_scale(q.shape[3], scale), delta,
                    block_q, block_k, tile_plan)


class TritonAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: gradients flow through ``out``; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, q_coords, k_coords, mask, scale, block_q, block_k):
        # One tile plan for forward and backward (dozens of small device ops).
        empty = q.shape[1] == 0 or k.shape[1] == 0 or q.shape[0] * q.shape[2] == 0
        tile_plan = None if empty else plan(q_coords, k_coords, mask, q.shape[0], q.device,
                                            use_kernel=not interpret_mode(q.device))
        out, lse = triton_forward(q, k, v, q_coords, k_coords, mask, scale, block_q, block_k, tile_plan=tile_plan)
        ctx.save_for_backward(q, k, v, out, lse, *q_coords, *k_coords)
        ctx.settings = (mask, scale, block_q, block_k)
        ctx.tile_plan = tile_plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_pos, q_doc, k_pos, k_doc = ctx.saved_tensors
        mask, scale, block_q, block_k = ctx.settings
        dq, dk, dv = triton_backward(dout, q, k, v, out, lse, Coords(q_pos, q_doc), Coords(k_pos, k_doc), mask,
                                     scale, block_q=block_q, block_k=block_k, tile_plan=ctx.tile_plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 6)


def triton_attention(q, k, v, q_coords: Coords, k_coords: Coords, mask: Mask = CAUSAL, scale=None,
                     block_q=None, block_k=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Triton attention; same contract as ``blockwise_attention``."""
    return TritonAttentionFunction.apply(q, k, v, q_coords, k_coords, mask, scale, block_q, block_k)
