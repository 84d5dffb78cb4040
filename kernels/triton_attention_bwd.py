"""Backward of the Triton attention kernels (FlashAttention-2 style, two kernels, no atomics).

``_attn_bwd_dkdv``: one program per (key tile, batch * K/V head) loops over the query heads of
its GQA group and over the query tiles its key tile may see, accumulating dK and dV in float32.
``_attn_bwd_dq``: one program per (query tile, batch * head) loops over the key tiles, as the
forward does. Both recompute probabilities from the externally supplied (merged) ``lse`` and
skip tiles with the same coordinate summaries as the forward (see ``triton_attention``).
"""

from __future__ import annotations

import torch

from .triton_attention import (
    DKDV_CONFIGS, DQ_CONFIGS, LOG2E, interpret_mode, common_consts, coord_args, kernel_inputs, launch,
    plan, tl,
)


def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, QPOS, QDOC, KPOS, KDOC, QINFO, KINFO,
                   s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
                   s_cq, s_ck, s_iq, s_ik, num_q_runs, num_k_runs, num_heads, num_kv_heads, group,
                   seq_q, seq_k, head_dim, scale, scale_log2, window, TUNE_SQ, TUNE_SK,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   LEVEL_M: tl.constexpr, LEVEL_N: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)  # int64 offsets: > 2**31 elements at long context
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_n = offs_n < seq_k
    in_d = offs_d < head_dim
    kv_mask = in_n[:, None] & in_d[None, :]
    k = tl.load(K + b * s_kb + offs_n[:, None] * s_ks + hk * s_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + offs_n[:, None] * s_vs + hk * s_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    k_pos = tl.load(KPOS + b * s_ck + offs_n, mask=in_n, other=0)
    k_doc = tl.load(KDOC + b * s_ck + offs_n, mask=in_n, other=-2)
    ki = KINFO + b * s_ik + (LEVEL_N * num_k_runs + pid_n) * 8
    kp_min, kp_max = tl.load(ki + 0), tl.load(ki + 1)
    kd_min, kd_max, kd_lo = tl.load(ki + 2), tl.load(ki + 3), tl.load(ki + 4)
    qt_lo = (tl.load(ki + 5) // BLOCK_M)
    qt_hi = ((tl.load(ki + 6) + BLOCK_M - 1) // BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        for qt in range(qt_lo, qt_hi):
            qi = QINFO + b * s_iq + (LEVEL_M * num_q_runs + qt) * 8
            qp_min, qp_max = tl.load(qi + 0), tl.load(qi + 1)
            qd_min, qd_max, qd_lo = tl.load(qi + 2), tl.load(qi + 3), tl.load(qi + 4)
            may = (qd_max != -1) & (kd_max != -1) & (qd_lo <= kd_max) & (kd_lo <= qd_max)
            if CAUSAL:
                may = may & (kp_min <= qp_max)
            if HAS_WINDOW:
                may = may & (qp_min - kp_max < window)
                if not CAUSAL:
                    may = may & (kp_min - qp_max < window)
            if may:
                offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
                in_m = offs_m < seq_q
                q_mask = in_m[:, None] & in_d[None, :]
                q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qs + h * s_qh + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(DO + b * s_qb + offs_m[:, None] * s_qs + h * s_qh + offs_d[None, :], mask=q_mask, other=0.0)
                lse = tl.load(LSE + (b * num_heads + h) * seq_q + offs_m, mask=in_m, other=float("inf"))
                # A row that saw no key anywhere (lse -inf) gets probabilities exp2(s - inf) = 0.
                lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
                delta = tl.load(DELTA + (b * num_heads + h) * seq_q + offs_m, mask=in_m, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2
                full = (qd_min == qd_max) & (kd_min == kd_max) & (qd_min == kd_min)
                full = full & ((pid_n + 1) * BLOCK_N <= seq_k)
                if CAUSAL:
                    full = full & (kp_max <= qp_min)
                if HAS_WINDOW:
                    full = full & (qp_max - kp_min < window)
                    if not CAUSAL:
                        full = full & (kp_max - qp_min < window)
                if not full:
                    q_pos = tl.load(QPOS + b * s_cq + offs_m, mask=in_m, other=0)
                    q_doc = tl.load(QDOC + b * s_cq + offs_m, mask=in_m, other=-1)
                    vis = (k_doc[:, None] == q_doc[None, :]) & (q_doc[None, :] != -1)
                    dist = q_pos[None, :] - k_pos[:, None]
                    if CAUSAL:
                        vis = vis & (dist >= 0)
                    if HAS_WINDOW:
                        vis = vis & (dist < window) & (dist > -window)
                    s_t = tl.where(vis, s_t, float("-inf"))
                p_t = tl.math.exp2(s_t - lse[None, :])
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    out_mask = in_n[:, None] & in_d[None, :]
    tl.store(DK + b * s_db + offs_n[:, None] * s_ds + hk * s_dh + offs_d[None, :], dk * scale, mask=out_mask)
    tl.store(DV + b * s_db + offs_n[:, None] * s_ds + hk * s_dh + offs_d[None, :], dv, mask=out_mask)


def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, QPOS, QDOC, KPOS, KDOC, QINFO, KINFO,
                 s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
                 s_cq, s_ck, s_iq, s_ik, num_q_runs, num_k_runs, num_heads, group, seq_q, seq_k,
                 head_dim, scale, scale_log2, window, TUNE_SQ, TUNE_SK,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 LEVEL_M: tl.constexpr, LEVEL_N: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)  # int64 offsets: > 2**31 elements at long context
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_m = offs_m < seq_q
    in_d = offs_d < head_dim
    q_mask = in_m[:, None] & in_d[None, :]
    q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qs + h * s_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * s_qb + offs_m[:, None] * s_qs + h * s_qh + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * seq_q + offs_m, mask=in_m, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * seq_q + offs_m, mask=in_m, other=0.0)
    q_pos = tl.load(QPOS + b * s_cq + offs_m, mask=in_m, other=0)
    q_doc = tl.load(QDOC + b * s_cq + offs_m, mask=in_m, other=-1)
    qi = QINFO + b * s_iq + (LEVEL_M * num_q_runs + pid_m) * 8
    qp_min, qp_max = tl.load(qi + 0), tl.load(qi + 1)
    qd_min, qd_max, qd_lo = tl.load(qi + 2), tl.load(qi + 3), tl.load(qi + 4)
    kt_lo = (tl.load(qi + 5) // BLOCK_N)
    kt_hi = ((tl.load(qi + 6) + BLOCK_N - 1) // BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for kt in range(kt_lo, kt_hi):
        ki = KINFO + b * s_ik + (LEVEL_N * num_k_runs + kt) * 8
        kp_min, kp_max = tl.load(ki + 0), tl.load(ki + 1)
        kd_min, kd_max, kd_lo = tl.load(ki + 2), tl.load(ki + 3), tl.load(ki + 4)
        may = (qd_max != -1) & (kd_max != -1) & (qd_lo <= kd_max) & (kd_lo <= qd_max)
        if CAUSAL:
            may = may & (kp_min <= qp_max)
        if HAS_WINDOW:
            may = may & (qp_min - kp_max < window)
            if not CAUSAL:
                may = may & (kp_min - qp_max < window)
        if may:
            offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            in_n = offs_n < seq_k
            kv_mask = in_n[:, None] & in_d[None, :]
            k = tl.load(K + b * s_kb + offs_n[:, None] * s_ks + hk * s_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + b * s_vb + offs_n[:, None] * s_vs + hk * s_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
            full = (qd_min == qd_max) & (kd_min == kd_max) & (qd_min == kd_min) & ((kt + 1) * BLOCK_N <= seq_k)
            if CAUSAL:
                full = full & (kp_max <= qp_min)
            if HAS_WINDOW:
                full = full & (qp_max - kp_min < window)
                if not CAUSAL:
                    full = full & (kp_max - qp_min < window)
            if not full:
                k_pos = tl.load(KPOS + b * s_ck + offs_n, mask=in_n, other=0)
                k_doc = tl.load(KDOC + b * s_ck + offs_n, mask=in_n, other=-2)
                vis = (q_doc[:, None] == k_doc[None, :]) & (q_doc[:, None] != -1)
                dist = q_pos[:, None] - k_pos[None, :]
                if CAUSAL:
                    vis = vis & (dist >= 0)
                if HAS_WINDOW:
                    vis = vis & (dist < window) & (dist > -window)
                s = tl.where(vis, s, float("-inf"))
            p = tl.math.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(DQ + b * s_db + offs_m[:, None] * s_ds + h * s_dh + offs_d[None, :], dq * scale, mask=q_mask)


DKDV_SPEC = (_attn_bwd_dkdv, DKDV_CONFIGS, "BLOCK_M", "BLOCK_N")
DQ_SPEC = (_attn_bwd_dq, DQ_CONFIGS, "BLOCK_N", "BLOCK_M")


def backward(dout, q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc, causal, window, scale, delta,
             block_q, block_k):
    """See ``triton_attention.triton_backward`` (inputs already checked, scale resolved)."""
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
    qp, qd, kp, kd, q_info, k_info = plan(q_pos, k_pos, q_doc, k_doc, causal, window, batch, q.device)
    common = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3]]
    coords = coord_args(qp, kp, q_info, k_info)
    tail = [seq_q, seq_k, head_dim, scale, scale * LOG2E, window or 0]
    consts = common_consts(q, seq_q, seq_k, causal, window)
    launch(DKDV_SPEC, "BLOCK_N", (seq_k, batch * num_kv_heads),
           [q, k, v, dout, lse, delta, dk, dv, qp, qd, kp, kd, q_info, k_info, *common, *dk.stride()[:3],
            *coords, num_heads, num_kv_heads, num_heads // num_kv_heads, *tail],
           consts, interpret, block_q, block_k)
    launch(DQ_SPEC, "BLOCK_M", (seq_q, batch * num_heads),
           [q, k, v, dout, lse, delta, dq, qp, qd, kp, kd, q_info, k_info, *common, *dq.stride()[:3],
            *coords, num_heads, num_heads // num_kv_heads, *tail],
           consts, interpret, block_q, block_k)
    return dq, dk, dv
