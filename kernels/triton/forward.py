"""Forward Triton attention kernel (FlashAttention-2 style) on global token coordinates.

Cost follows the unmasked work. ``plan`` gives every tile the span of the other side's tiles
that may be visible and the span that is fully visible. A program loops over the masked tiles
before the full span, the full span without any mask arithmetic, and the masked tiles after
it; tiles outside the "may" span are never loaded. Each loop has unconditional loads, so
Triton software-pipelines them (and uses wgmma on Hopper). Block sizes are free for the
autotuner. Offsets are int64 (sequences of millions of tokens).

CPU tensors (or ``TRITON_INTERPRET=1``) run through the Triton interpreter; see ``launch`` for
how the kernels are wrapped for each mode.
"""

from __future__ import annotations

import torch

from ..mask import Coords, Mask
from .consts import LOG2E
from .launch import FWD_CONFIGS, common_consts, device_fn, interpret_mode, kernel_inputs, launch, tl
from .plan import coord_args, plan
from .tiles import _key_tile, _query_program, _store_rows


@device_fn
def _fwd_tiles(acc, l_i, m_i, q, q_pos, q_doc, K, V, KPOS, KDOC, s_ks, s_vs, seq_k, scale_log2, window,
               first, last, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key tiles [first, last); ``MASKED`` applies the mask rule."""
    for kt in range(first, last):
        _, v, s = _key_tile(q, q_pos, q_doc, K, V, KPOS, KDOC, s_ks, s_vs, seq_k, scale_log2, window,
                            kt * BLOCK_N, MASKED, CAUSAL, HAS_WINDOW, HEAD_DIM, BLOCK_D, DOT_PREC, BLOCK_N)
        if MASKED:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that saw nothing yet keep max -inf: shift by 0 so exp2 gives 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            shift = m_new
        p = tl.math.exp2(s - shift[:, None])
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


def _attn_fwd(Q, K, V, O, LSE, QPOS, QDOC, KPOS, KDOC, QINFO, KINFO,
              s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
              s_cq, s_ck, s_iq, s_ik, num_q_runs, num_k_runs, num_heads, group, seq_q, seq_k,
              scale_log2, window, TUNE_SQ, TUNE_SK,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, b, h, hk, start_m, q, q_pos, q_doc, lo, full_lo, full_hi, hi = _query_program(
        Q, QPOS, QDOC, QINFO, s_qb, s_qs, s_qh, s_cq, s_iq, num_q_runs, num_heads, group, seq_q, HEAD_DIM, BLOCK_D,
        BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base, v_base = K + b * s_kb + hk * s_kh, V + b * s_vb + hk * s_vh
    kpos_base, kdoc_base = KPOS + b * s_ck, KDOC + b * s_ck
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, q_doc, k_base, v_base, kpos_base, kdoc_base, s_ks, s_vs,
                               seq_k, scale_log2, window, lo, full_lo, True, CAUSAL, HAS_WINDOW, HEAD_DIM,
                               BLOCK_D, DOT_PREC, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, q_doc, k_base, v_base, kpos_base, kdoc_base, s_ks, s_vs,
                               seq_k, scale_log2, window, full_lo, full_hi, False, CAUSAL, HAS_WINDOW, HEAD_DIM,
                               BLOCK_D, DOT_PREC, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_pos, q_doc, k_base, v_base, kpos_base, kdoc_base, s_ks, s_vs,
                               seq_k, scale_log2, window, full_hi, hi, True, CAUSAL, HAS_WINDOW, HEAD_DIM,
                               BLOCK_D, DOT_PREC, BLOCK_N)

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    _store_rows(O + b * s_ob + h * s_oh, start_m, s_os, seq_q, out.to(O.dtype.element_ty), HEAD_DIM, BLOCK_D,
                BLOCK_M)
    rows = tl.arange(0, BLOCK_M)
    tl.store(LSE + pid_bh * seq_q + start_m + rows, lse, mask=rows < seq_q - start_m)


FWD_SPEC = (_attn_fwd, FWD_CONFIGS, "BLOCK_N", "BLOCK_M")


def forward(q, k, v, q_coords: Coords, k_coords: Coords, mask: Mask, scale: float, block_q, block_k,
            out_dtype=None, tile_plan=None) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``attention.triton_forward`` (inputs already checked, scale resolved)."""
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    out = torch.zeros(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.full((batch, num_heads, seq_q), float("-inf"), dtype=torch.float32, device=q.device)
    if seq_q == 0 or seq_k == 0 or batch * num_heads == 0:
        return out, lse
    interpret = interpret_mode(q.device)
    q, k, v = kernel_inputs(interpret, q, k, v)
    # The kernel stores in its output's dtype: q's, or float32 when asked for.
    result = out if out.dtype in (q.dtype, torch.float32) else out.to(q.dtype)
    qp, qd, kp, kd, q_info, k_info = tile_plan or plan(q_coords, k_coords, mask, batch, q.device,
                                                       use_kernel=not interpret)
    args = [q, k, v, result, lse, qp, qd, kp, kd, q_info, k_info,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *result.stride()[:3],
            *coord_args(qp, kp, q_info, k_info), num_heads, num_heads // num_kv_heads, seq_q, seq_k,
            scale * LOG2E, mask.window or 0]
    consts = common_consts(q, seq_q, seq_k, mask)
    launch(FWD_SPEC, "BLOCK_M", (seq_q, batch * num_heads), args, consts, interpret, block_q, block_k)
    return result.to(out.dtype), lse
