"""Backward of the Triton attention kernels (FlashAttention-2 style, two kernels, no atomics).

``_attn_bwd_dkdv``: one program per (key tile, batch * K/V head) loops over the query heads of
its GQA group and over the query tiles its key tile may see, accumulating dK and dV in float32.
``_attn_bwd_dq``: one program per (query tile, batch * head) loops over the key tiles, as the
forward does. Both recompute probabilities from the externally supplied (merged) ``lse`` and
split their loops into masked and fully visible spans exactly as the forward does (see
``forward`` and ``plan``).
"""

from __future__ import annotations

import torch

from ..mask import Coords, Mask
from .consts import LOG2E
from .launch import DKDV_CONFIGS, DQ_CONFIGS, common_consts, device_fn, interpret_mode, kernel_inputs, launch, tl
from .plan import coord_args, plan
from .tiles import _key_tile, _load_coords, _load_rows, _query_program, _store_rows, _tile_ranges, _visible


@device_fn
def _row_stats(LSE, DELTA, start, seq_q, CHECK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """lse (in log2 units) and delta of query rows [start, start + BLOCK). A row that saw no key
    anywhere (lse -inf) gets lse +inf, so its probabilities exp2(s - lse) are 0."""
    rows = tl.arange(0, BLOCK)
    if CHECK_ROWS:
        inside = rows < seq_q - start
        lse = tl.load(LSE + start + rows, mask=inside, other=float("inf"))
        delta = tl.load(DELTA + start + rows, mask=inside, other=0.0)
    else:
        lse = tl.load(LSE + start + rows)
        delta = tl.load(DELTA + start + rows)
    return tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634, delta


@device_fn
def _dkdv_tiles(dk, dv, k, v, k_pos, k_doc, Q, DO, LSE, DELTA, QPOS, QDOC, s_qs, seq_q, scale_log2, window,
                first, last, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV of one key tile from query tiles [first, last) of one head (scores transposed)."""
    for qt in range(first, last):
        start_m = qt * BLOCK_M
        q = _load_rows(Q, start_m, s_qs, seq_q, MASKED, HEAD_DIM, BLOCK_D, BLOCK_M)
        do = _load_rows(DO, start_m, s_qs, seq_q, MASKED, HEAD_DIM, BLOCK_D, BLOCK_M)
        lse, delta = _row_stats(LSE, DELTA, start_m, seq_q, MASKED, BLOCK_M)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2
        if MASKED:
            q_pos, q_doc = _load_coords(QPOS, QDOC, start_m, seq_q, -1, BLOCK_M)
            vis = _visible(q_pos[None, :], q_doc[None, :], k_pos[:, None], k_doc[:, None], window, CAUSAL, HAS_WINDOW)
            s_t = tl.where(vis, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@device_fn
def _dq_tiles(dq, q, do, lse, delta, q_pos, q_doc, K, V, KPOS, KDOC, s_ks, s_vs, seq_k, scale_log2, window,
              first, last, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query tile from key tiles [first, last)."""
    for kt in range(first, last):
        k, v, s = _key_tile(q, q_pos, q_doc, K, V, KPOS, KDOC, s_ks, s_vs, seq_k, scale_log2, window,
                            kt * BLOCK_N, MASKED, CAUSAL, HAS_WINDOW, HEAD_DIM, BLOCK_D, DOT_PREC, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, QPOS, QDOC, KPOS, KDOC, QINFO, KINFO,
                   s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
                   s_cq, s_ck, s_iq, s_ik, num_q_runs, num_k_runs, num_heads, num_kv_heads, group,
                   seq_q, seq_k, scale, scale_log2, window, TUNE_SQ, TUNE_SK,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)  # int64 bases: > 2**31 elements at long context
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    start_n = pid_n * BLOCK_N
    k = _load_rows(K + b * s_kb + hk * s_kh, start_n, s_ks, seq_k, True, HEAD_DIM, BLOCK_D, BLOCK_N)
    v = _load_rows(V + b * s_vb + hk * s_vh, start_n, s_vs, seq_k, True, HEAD_DIM, BLOCK_D, BLOCK_N)
    k_pos, k_doc = _load_coords(KPOS + b * s_ck, KDOC + b * s_ck, start_n, seq_k, -2, BLOCK_N)
    lo, full_lo, full_hi, hi = _tile_ranges(KINFO + b * s_ik, pid_n, num_k_runs, BLOCK_N, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qpos_base, qdoc_base = QPOS + b * s_cq, QDOC + b * s_cq
    for g in range(0, group):
        h = hk * group + g
        q_base, do_base = Q + b * s_qb + h * s_qh, DO + b * s_qb + h * s_qh
        lse_base, delta_base = LSE + (b * num_heads + h) * seq_q, DELTA + (b * num_heads + h) * seq_q
        dk, dv = _dkdv_tiles(dk, dv, k, v, k_pos, k_doc, q_base, do_base, lse_base, delta_base, qpos_base,
                             qdoc_base, s_qs, seq_q, scale_log2, window, lo, full_lo, True, CAUSAL, HAS_WINDOW,
                             HEAD_DIM, BLOCK_D, DOT_PREC, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, k_pos, k_doc, q_base, do_base, lse_base, delta_base, qpos_base,
                             qdoc_base, s_qs, seq_q, scale_log2, window, full_lo, full_hi, False, CAUSAL,
                             HAS_WINDOW, HEAD_DIM, BLOCK_D, DOT_PREC, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, k_pos, k_doc, q_base, do_base, lse_base, delta_base, qpos_base,
                             qdoc_base, s_qs, seq_q, scale_log2, window, full_hi, hi, True, CAUSAL, HAS_WINDOW,
                             HEAD_DIM, BLOCK_D, DOT_PREC, BLOCK_M)
    _store_rows(DK + b * s_db + hk * s_dh, start_n, s_ds, seq_k, dk * scale, HEAD_DIM, BLOCK_D, BLOCK_N)
    _store_rows(DV + b * s_db + hk * s_dh, start_n, s_ds, seq_k, dv, HEAD_DIM, BLOCK_D, BLOCK_N)


def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, QPOS, QDOC, KPOS, KDOC, QINFO, KINFO,
                 s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
                 s_cq, s_ck, s_iq, s_ik, num_q_runs, num_k_runs, num_heads, group, seq_q, seq_k,
                 scale, scale_log2, window, TUNE_SQ, TUNE_SK,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, b, h, hk, start_m, q, q_pos, q_doc, lo, full_lo, full_hi, hi = _query_program(
        Q, QPOS, QDOC, QINFO, s_qb, s_qs, s_qh, s_cq, s_iq, num_q_runs, num_heads, group, seq_q, HEAD_DIM, BLOCK_D,
        BLOCK_M, BLOCK_N)
    do = _load_rows(DO + b * s_qb + h * s_qh, start_m, s_qs, seq_q, True, HEAD_DIM, BLOCK_D, BLOCK_M)
    lse, delta = _row_stats(LSE + pid_bh * seq_q, DELTA + pid_bh * seq_q, start_m, seq_q, True, BLOCK_M)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base, v_base = K + b * s_kb + hk * s_kh, V + b * s_vb + hk * s_vh
    kpos_base, kdoc_base = KPOS + b * s_ck, KDOC + b * s_ck
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, q_doc, k_base, v_base, kpos_base, kdoc_base, s_ks, s_vs, seq_k,
                   scale_log2, window, lo, full_lo, True, CAUSAL, HAS_WINDOW, HEAD_DIM, BLOCK_D, DOT_PREC, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, q_doc, k_base, v_base, kpos_base, kdoc_base, s_ks, s_vs, seq_k,
                   scale_log2, window, full_lo, full_hi, False, CAUSAL, HAS_WINDOW, HEAD_DIM, BLOCK_D, DOT_PREC,
                   BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, q_pos, q_doc, k_base, v_base, kpos_base, kdoc_base, s_ks, s_vs, seq_k,
                   scale_log2, window, full_hi, hi, True, CAUSAL, HAS_WINDOW, HEAD_DIM, BLOCK_D, DOT_PREC, BLOCK_N)
    _store_rows(DQ + b * s_db + h * s_dh, start_m, s_ds, seq_q, dq * scale, HEAD_DIM, BLOCK_D, BLOCK_M)


DKDV_SPEC = (_attn_bwd_dkdv, DKDV_CONFIGS, "BLOCK_M", "BLOCK_N")
DQ_SPEC = (_attn_bwd_dq, DQ_CONFIGS, "BLOCK_N", "BLOCK_M")


def backward(dout, q, k, v, out, lse, q_coords: Coords, k_coords: Coords, mask: Mask, scale: float, delta,
             block_q, block_k, tile_plan=None):
    """See ``attention.triton_backward`` (inputs already checked, scale resolved)."""
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    if seq_q == 0 or seq_k == 0 or batch * num_heads == 0:
        return dq, dk, dv
    if delta is None:
        delta = (dout.float() * out.float()).sum(dim=-1).transpose(1, 2)
    delta = delta.to(torch.float32).reshape(batch, num_heads, seq_q).contiguous()
    lse = lse.to(torch.float32).reshape(batch, num_heads, seq_q).contiguous()
    interpret = interpret_mode(q.device)
    q, k, v, dout = kernel_inputs(interpret, q, k, v, dout.to(q.dtype))
    if dout.stride() != q.stride():  # the kernels read dO with q's strides
        dout, q = dout.contiguous(), q.contiguous()
    qp, qd, kp, kd, q_info, k_info = tile_plan or plan(q_coords, k_coords, mask, batch, q.device,
                                                       use_kernel=not interpret)
    common = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3]]
    coords = coord_args(qp, kp, q_info, k_info)
    tail = [seq_q, seq_k, scale, scale * LOG2E, mask.window or 0]
    consts = common_consts(q, seq_q, seq_k, mask)
    launch(DKDV_SPEC, "BLOCK_N", (seq_k, batch * num_kv_heads),
           [q, k, v, dout, lse, delta, dk, dv, qp, qd, kp, kd, q_info, k_info, *common, *dk.stride()[:3],
            *coords, num_heads, num_kv_heads, num_heads // num_kv_heads, *tail],
           consts, interpret, block_q, block_k)
    launch(DQ_SPEC, "BLOCK_M", (seq_q, batch * num_heads),
           [q, k, v, dout, lse, delta, dq, qp, qd, kp, kd, q_info, k_info, *common, *dq.stride()[:3],
            *coords, num_heads, num_heads // num_kv_heads, *tail],
           consts, interpret, block_q, block_k)
    return dq, dk, dv
