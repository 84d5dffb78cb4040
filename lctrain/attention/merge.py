"""Merging partial attention results computed over disjoint key blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_partials(
    out: torch.Tensor, lse: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (out, lse) over some keys with (out_blk, lse_blk) over other keys.

    out: (b, s, h, d), lse: (b, h, s). Computes in float32 (float64 stays
    float64) with the stable sigmoid form; a side whose lse is -inf (saw no
    key) contributes nothing, and two -inf sides stay -inf with out 0, no NaN.
    """
    dtype = torch.promote_types(torch.promote_types(out.dtype, out_blk.dtype), torch.float32)
    out, out_blk = out.to(dtype), out_blk.to(dtype)
    lse, lse_blk = lse.to(dtype), lse_blk.to(dtype)
    neg_inf = float("-inf")

    # Weight of the new block: sigmoid(lse_blk - lse), which is NaN when both are
    # -inf; an empty new block must weigh exactly 0 either way.
    blk_weight = torch.where(lse_blk == neg_inf, 0.0, torch.sigmoid(lse_blk - lse))
    out = out - blk_weight.transpose(1, 2).unsqueeze(-1) * (out - out_blk)

    # lse - logsigmoid(lse - lse_blk), written from the larger side so an empty
    # side gives a gap of +inf (logsigmoid(inf) = 0) instead of -inf - -inf.
    hi, lo = torch.maximum(lse, lse_blk), torch.minimum(lse, lse_blk)
    gap = torch.where(lo == neg_inf, float("inf"), hi - lo)
    return out, hi - F.logsigmoid(gap)
