"""Device functions shared by the forward and backward Triton attention kernels.

Tiles are addressed as an int64 scalar base (program and tile start) plus int32 offsets inside
the tile: cheap pointer arithmetic, and no overflow at millions of tokens. The mask rule is
``mask.py``'s: query i sees key j iff ``doc[i] == doc[j] != PAD_DOC`` and, when causal,
``pos[j] <= pos[i]``, and with a window ``w``, ``pos[i] - pos[j] < w`` (``|.| < w`` non-causal).
"""

from __future__ import annotations

from .launch import NO_BOUND, device_fn, tl

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
