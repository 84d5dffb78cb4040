"""FlashAttention-2 style Triton kernels on global token coordinates (forward here, backward in
``triton_attention_bwd``); same contract as ``torch_blockwise.blockwise_forward/backward``.

Mask rule (``mask.py``): query i sees key j iff ``doc[i] == doc[j] != PAD_DOC`` and, when causal,
``pos[j] <= pos[i]``, and with a window ``w``, ``pos[i] - pos[j] < w`` (``|.| < w`` non-causal).

Cost follows the unmasked work. ``triton_plan`` gives every tile the span of the other side's
tiles that may be visible and the span that is fully visible. A program loops over the masked
tiles before the full span, the full span without any mask arithmetic, and the masked tiles
after it; tiles outside the "may" span are never loaded. Each loop has unconditional loads, so
Triton software-pipelines them (and uses wgmma on Hopper). Block sizes are free for the
autotuner. Offsets are int64 (sequences of millions of tokens).

CPU tensors (or ``TRITON_INTERPRET=1``) run through the Triton interpreter; see
``triton_launch`` for how the kernels are wrapped for each mode.
"""

from __future__ import annotations

import torch

from .reference import default_scale
from .triton_launch import (
    FWD_CONFIGS, LOG2E, NO_BOUND, check_inputs, common_consts, device_fn, interpret_mode,
    kernel_inputs, launch, require_triton, tl,
)
from .triton_plan import coord_args, plan

# ------------------------------------------------------------------------ device functions
# Tiles are addressed as an int64 scalar base (program and tile start) plus int32 offsets inside
# the tile: cheap pointer arithmetic, and no overflow at millions of tokens.


@device_fn
def _load_rows(base, start, row_stride, num_rows, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [start, start + BLOCK) of a (rows, HEAD_DIM) matrix as a (BLOCK, BLOCK_D) tile. Only
    what can be out of range is masked, so tiles proven full load plainly."""
    rows = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + start * row_stride + rows[:, None] * row_stride + offs_d[None, :]
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=(rows < num_rows - start)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < num_rows - start)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@device_fn
def _store_rows(base, start, row_stride, num_rows, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + start * row_stride + rows[:, None] * row_stride + offs_d[None, :]
    tl.store(ptrs, value, mask=(rows < num_rows - start)[:, None] & (offs_d < HEAD_DIM)[None, :])


@device_fn
def _load_coords(POS, DOC, start, num, OUTSIDE_DOC: tl.constexpr, BLOCK: tl.constexpr):
    """int32 positions and documents of tokens [start, start + BLOCK); tokens past the end get
    document OUTSIDE_DOC (-1 for queries, -2 for keys: never equal, so never visible)."""
    rows = tl.arange(0, BLOCK)
    inside = rows < num - start
    pos = tl.load(POS + start + rows, mask=inside, other=0)
    doc = tl.load(DOC + start + rows, mask=inside, other=OUTSIDE_DOC)
    return pos, doc


@device_fn
def _visible(q_pos, q_doc, k_pos, k_doc, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The mask rule on broadcastable coordinates (queries on rows or on columns)."""
    vis = (q_doc == k_doc) & (q_doc != -1)
    dist = q_pos - k_pos
    if CAUSAL:
        vis = vis & (dist >= 0)
    if HAS_WINDOW:
        vis = vis & (dist < window) & (dist > -window)
    return vis


@device_fn
def _mask_query_rows(s, q_pos, q_doc, KPOS, KDOC, start_n, seq_k, window, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores (queries x keys [start_n, start_n + BLOCK_N)) with invisible pairs at -inf."""
    k_pos, k_doc = _load_coords(KPOS, KDOC, start_n, seq_k, -2, BLOCK_N)
    vis = _visible(q_pos[:, None], q_doc[:, None], k_pos[None, :], k_doc[None, :], window, CAUSAL, HAS_WINDOW)
    return tl.where(vis, s, float("-inf"))


@device_fn
def _key_tile(q, q_pos, q_doc, K, V, KPOS, KDOC, s_ks, s_vs, seq_k, scale_log2, window, start_n,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """K and V of the key tile at start_n and the query tile's scores against it (log2 units,
    invisible pairs at -inf when ``MASKED``)."""
    k = _load_rows(K, start_n, s_ks, seq_k, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N)
    v = _load_rows(V, start_n, s_vs, seq_k, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    if MASKED:
        s = _mask_query_rows(s, q_pos, q_doc, KPOS, KDOC, start_n, seq_k, window, CAUSAL, HAS_WINDOW, BLOCK_N)
    return k, v, s


@device_fn
def _tile_ranges(INFO, tile, num_runs, BLOCK_THIS: tl.constexpr, BLOCK: tl.constexpr):
    """Tile indexes (lo, full_lo, full_hi, hi) of the other side for this side's tile: masked
    [lo, full_lo), full [full_lo, full_hi), masked [full_hi, hi). Merges the tile's 16-token
    runs from the plan; full tiles are whole tiles inside the span."""
    runs = tile * (BLOCK_THIS // 16) + tl.arange(0, BLOCK_THIS // 16)
    inside = runs < num_runs
    row = INFO + runs * 4
    lo = tl.min(tl.load(row, mask=inside, other=NO_BOUND), 0) // BLOCK
    hi = (tl.max(tl.load(row + 1, mask=inside, other=0), 0) + BLOCK - 1) // BLOCK
    full_lo = tl.max(tl.load(row + 2, mask=inside, other=0), 0)
    full_hi = tl.min(tl.load(row + 3, mask=inside, other=NO_BOUND), 0)
    full_lo = tl.minimum(tl.maximum((full_lo + BLOCK - 1) // BLOCK, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi // BLOCK, full_lo), hi)
    return lo, full_lo, full_hi, hi


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


@device_fn
def _query_program(Q, QPOS, QDOC, QINFO, s_qb, s_qs, s_qh, s_cq, s_iq, num_q_runs, num_heads, group, seq_q,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Set-up of a program that owns a query tile (forward, dQ): its batch and head indexes
    (pid_bh, b, h, K/V head hk), first row, Q tile, coordinates and key-tile spans."""
    pid_m = tl.program_id(0).to(tl.int64)  # int64 bases: > 2**31 elements at long context
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start_m = pid_m * BLOCK_M
    q = _load_rows(Q + b * s_qb + h * s_qh, start_m, s_qs, seq_q, True, HEAD_DIM, BLOCK_D, BLOCK_M)
    q_pos, q_doc = _load_coords(QPOS + b * s_cq, QDOC + b * s_cq, start_m, seq_q, -1, BLOCK_M)
    lo, full_lo, full_hi, hi = _tile_ranges(QINFO + b * s_iq, pid_m, num_q_runs, BLOCK_M, BLOCK_N)
    return pid_bh, b, h, h // group, start_m, q, q_pos, q_doc, lo, full_lo, full_hi, hi


# ---------------------------------------------------------------------------------- forward


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


def triton_forward(q, k, v, q_pos, k_pos, q_doc, k_doc, causal=True, window=None, scale=None,
                   block_q=None, block_k=None, out_dtype=None, tile_plan=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``blockwise_forward``: out (b, sq, h, d) in q's dtype, lse (b, h, sq)
    float32, -inf (and out 0) for rows that see no key. ``block_q``/``block_k`` fix the tiles
    (powers of two >= 16) instead of autotuning; ``out_dtype`` (e.g. float32) keeps a partial
    output unrounded for a later merge. ``tile_plan``: ``triton_plan.plan``'s result for these
    coordinates, to share one plan between a forward and its backward."""
    require_triton()
    check_inputs(q, k, v, window)
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
    qp, qd, kp, kd, q_info, k_info = tile_plan or plan(q_pos, k_pos, q_doc, k_doc, causal, window, batch,
                                                       q.device, use_kernel=not interpret)
    scale = default_scale(head_dim, scale)
    args = [q, k, v, result, lse, qp, qd, kp, kd, q_info, k_info,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *result.stride()[:3],
            *coord_args(qp, kp, q_info, k_info), num_heads, num_heads // num_kv_heads, seq_q, seq_k,
            scale * LOG2E, window or 0]
    consts = common_consts(q, seq_q, seq_k, causal, window)
    launch(FWD_SPEC, "BLOCK_M", (seq_q, batch * num_heads), args, consts, interpret, block_q, block_k)
    return result.to(out.dtype), lse


def triton_backward(dout, q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc, causal=True, window=None,
                    scale=None, delta=None, block_q=None, block_k=None, tile_plan=None):
    """Same contract as ``blockwise_backward``: ``lse`` (b, h, sq) may be the merged lse over all
    key blocks; ``delta`` (b, h, sq) = rowsum(dout * out) is computed when None. Returns dq
    (b, sq, h, d), dk and dv (b, sk, h_kv, d) in float32, dk/dv summed over each GQA group."""
    from .triton_attention_bwd import backward

    require_triton()
    check_inputs(q, k, v, window)
    return backward(dout, q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc, causal, window,
                    default_scale(q.shape[3], scale), delta, block_q, block_k, tile_plan)


class TritonAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: gradients flow through ``out``; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, q_doc, k_doc, causal, window, scale, block_q, block_k):
        # One tile plan for forward and backward (dozens of small device ops).
        empty = q.shape[1] == 0 or k.shape[1] == 0 or q.shape[0] * q.shape[2] == 0
        tile_plan = None if empty else plan(q_pos, k_pos, q_doc, k_doc, causal, window, q.shape[0], q.device,
                                            use_kernel=not interpret_mode(q.device))
        out, lse = triton_forward(q, k, v, q_pos, k_pos, q_doc, k_doc, causal, window, scale, block_q, block_k,
                                  tile_plan=tile_plan)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc)
        ctx.settings = (causal, window, scale, block_q, block_k)
        ctx.tile_plan = tile_plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc = ctx.saved_tensors
        causal, window, scale, block_q, block_k = ctx.settings
        dq, dk, dv = triton_backward(dout, q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc, causal, window,
                                     scale, block_q=block_q, block_k=block_k, tile_plan=ctx.tile_plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 9)


def triton_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, causal=True, window=None, scale=None,
                     block_q=None, block_k=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Triton attention; same contract as ``blockwise_attention``."""
    return TritonAttentionFunction.apply(q, k, v, q_pos, k_pos, q_doc, k_doc, causal, window, scale,
                                         block_q, block_k)


__all__ = ["triton_attention", "triton_backward", "triton_forward", "TritonAttentionFunction"]
