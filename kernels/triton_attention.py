"""FlashAttention-2 style Triton kernels on global token coordinates (forward here, backward in
``triton_attention_bwd``); same contract as ``torch_blockwise.blockwise_forward/backward``.

Mask rule (``mask.py``): query i sees key j iff ``doc[i] == doc[j] != PAD_DOC`` and, when causal,
``pos[j] <= pos[i]``, and with a window ``w``, ``pos[i] - pos[j] < w`` (``|.| < w`` non-causal).

Cost follows the unmasked work. The wrapper summarises every run of ``SUB`` (16) tokens of each
side (pos min/max, doc min/max, smallest non-padding doc, and the span of tokens of the *other*
side that may be visible: searchsorted over documents, which must be non-decreasing apart from
-1 padding, and over positions, which must be non-decreasing; an unsorted side falls back to the
full span), then merges runs pairwise into a pyramid with one level per block size. All of it
is a few torch ops on the device, no host sync. A program reads its tile's row at its block's
level, loops only over the other side's tiles inside the span, skips tiles proven fully masked
without loading them, and skips the mask arithmetic on tiles proven fully visible. Block sizes
are therefore free for the autotuner. Offsets are int64 (sequences of millions of tokens).

CPU tensors (or ``TRITON_INTERPRET=1``) run through the Triton interpreter. Triton wraps its
language helpers for the interpreter when it is first imported, so ``TRITON_INTERPRET=1`` must
be in the environment before anything imports triton (a clear error says so otherwise); this
module wraps its own kernels lazily, so importing it first does no harm.
"""

from __future__ import annotations

import os

import torch

from .mask import PAD_DOC, as_batched
from .reference import default_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; using a kernel raises
    triton = tl = None

SUB = 16  # granularity of the per-token-run summaries: the smallest block size
LEVEL_BLOCKS = (16, 32, 64, 128, 256)  # summary pyramid: level i summarises runs of 16 * 2**i tokens
BIG = 1 << 62  # "no bound" for int64 coordinates
LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_BLOCK = 16  # fixed small tiles under the interpreter: fast and many tiles per test

# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M tiles queries, BLOCK_N keys.
FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2),
               (128, 32, 4, 3), (64, 128, 4, 2)]
DKDV_CONFIGS = [(32, 128, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (64, 64, 4, 2), (16, 64, 4, 2)]
DQ_CONFIGS = [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2)]
FALLBACK_CONFIG = (64, 32, 4, 2)  # fits every GPU and head dim: used when pruning leaves nothing


def _require_triton():
    if triton is None:
        raise RuntimeError(
            "kernel='triton' needs the triton package, which is not installed; "
            "pip install triton (Linux x86_64) or use kernel='torch'"
        )


def interpret_mode(device: torch.device) -> bool:
    """CPU tensors (or TRITON_INTERPRET=1) run through the Triton interpreter."""
    interpret = device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    # triton.language's own helpers (tl.max, tl.sum, ...) are wrapped for the interpreter, or
    # not, once, when triton is first imported: a later switch cannot reach them.
    if interpret and isinstance(tl.max, triton.runtime.JITFunction):
        raise RuntimeError(
            "triton attention on CPU tensors runs through the Triton interpreter, which must be "
            "enabled before triton is first imported: set TRITON_INTERPRET=1 in the environment "
            "of the process (e.g. `TRITON_INTERPRET=1 python ...`), or use kernel='torch'"
        )
    return interpret


# ----------------------------------------------------------------------------------- autotune


def _shared_memory_limit(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # unknown driver: assume the smallest recent NVIDIA limit
        return 99 * 1024


def _prune(streamed: str, kept: str):
    """early_config_prune: drop configs whose pipelined tiles overflow shared memory.

    ``streamed`` is the block the inner loop streams (two tiles per stage: K and V, or Q and
    dO); ``kept`` the block resident in the program (two tiles as well, roughly)."""

    def prune(configs, named_args, **kwargs):
        block_d, elem = kwargs["BLOCK_D"], named_args["Q"].element_size()
        limit = _shared_memory_limit(named_args["Q"].device.index or 0)
        fitting = []
        for cfg in configs:
            s, k = cfg.kwargs[streamed], cfg.kwargs[kept]
            smem = (cfg.num_stages * 2 * s + 2 * k) * block_d * elem
            if smem <= limit and k * block_d <= 128 * 128:  # fp32 accumulator in registers
                fitting.append(cfg)
        if fitting:
            return fitting
        block_m, block_n, warps, stages = FALLBACK_CONFIG
        return [triton.Config(_blocks(block_m, block_n), num_warps=warps, num_stages=1)]

    return prune


def _blocks(block_m: int, block_n: int) -> dict:
    """Block constexprs, with the pyramid level each block reads its summaries from."""
    for block in (block_m, block_n):
        if block not in LEVEL_BLOCKS:
            raise ValueError(f"triton block sizes must be one of {LEVEL_BLOCKS}, got {block}")
    return {"BLOCK_M": block_m, "BLOCK_N": block_n,
            "LEVEL_M": LEVEL_BLOCKS.index(block_m), "LEVEL_N": LEVEL_BLOCKS.index(block_n)}


_TUNE_KEY = ["TUNE_SQ", "TUNE_SK", "BLOCK_D", "CAUSAL", "HAS_WINDOW", "DOT_PREC"]
_KERNELS: dict = {}


def get_kernel(body, configs, streamed: str, kept: str, interpret: bool, tuned: bool):
    """``body`` wrapped for the interpreter, or jit-compiled (and autotuned when ``tuned``)."""
    key = (body.__name__, interpret, tuned)
    if key not in _KERNELS:
        if interpret:  # Triton 3.x decides at decoration time, from TRITON_INTERPRET
            saved = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1"
            try:
                kernel = triton.jit(body)
            finally:
                if saved is None:
                    del os.environ["TRITON_INTERPRET"]
                else:
                    os.environ["TRITON_INTERPRET"] = saved
        else:
            kernel = triton.jit(body)
            if tuned:
                kernel = triton.autotune(
                    configs=[triton.Config(_blocks(m, n), num_warps=w, num_stages=s) for m, n, w, s in configs],
                    key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune(streamed, kept)},
                )(kernel)
        _KERNELS[key] = kernel
    return _KERNELS[key]


def launch(kernel_spec, grid_len: str, shape: tuple[int, int], args: list, consts: dict,
           interpret: bool, block_q: int | None, block_k: int | None) -> None:
    """Launch with a fixed config (interpreter, or explicit blocks) or through the autotuner.

    ``grid_len`` names the block that tiles the program axis ("BLOCK_M" or "BLOCK_N");
    ``shape`` is (that axis' length, number of programs along the batch*head axis)."""
    body, configs, streamed, kept = kernel_spec
    fixed = interpret or block_q is not None or block_k is not None
    kernel = get_kernel(body, configs, streamed, kept, interpret, tuned=not fixed)
    if fixed:
        block_m = block_q or (INTERPRETER_BLOCK if interpret else FALLBACK_CONFIG[0])
        block_n = block_k or (INTERPRETER_BLOCK if interpret else FALLBACK_CONFIG[1])
        blocks = _blocks(block_m, block_n)
        grid = (triton.cdiv(shape[0], blocks[grid_len]), shape[1])
        launch_opts = {} if interpret else {"num_warps": FALLBACK_CONFIG[2], "num_stages": FALLBACK_CONFIG[3]}
        kernel[grid](*args, **consts, **blocks, **launch_opts)
    else:
        kernel[lambda meta: (triton.cdiv(shape[0], meta[grid_len]), shape[1])](*args, **consts)


# ------------------------------------------------------------------------- coordinate summaries


def _summaries(pos: torch.Tensor, doc: torch.Tensor):
    """Per run of SUB tokens: pos min/max, doc min/max (padding included), min non-padding doc."""
    batch, seq = pos.shape
    num_sub = -(-seq // SUB)
    pad = num_sub * SUB - seq

    def runs(x):  # pad the last run by repeating its final token: bounds unchanged
        return torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1).view(batch, num_sub, SUB)

    p, d = runs(pos), runs(doc)
    doc_lo = torch.where(d == PAD_DOC, BIG, d).amin(2)
    return p.amin(2), p.amax(2), d.amin(2), d.amax(2), doc_lo


def _spans(this, other_pos, other_doc, lower, upper):
    """[lo, hi) token span of the other side that may be visible from each run of this side."""
    _, _, _, doc_max, doc_lo = this
    seq = other_pos.shape[1]
    mapped = other_doc.cummax(dim=1).values  # padding takes the previous doc: stays sorted
    doc_sorted = ((other_doc == mapped) | (other_doc == PAD_DOC)).all(dim=1, keepdim=True)
    lo = torch.where(doc_sorted, torch.searchsorted(mapped, doc_lo), 0)
    hi = torch.where(doc_sorted, torch.searchsorted(mapped, doc_max, right=True), seq)
    pos_sorted = (other_pos[:, 1:] >= other_pos[:, :-1]).all(dim=1, keepdim=True)
    if lower is not None:
        lo = torch.maximum(lo, torch.where(pos_sorted, torch.searchsorted(other_pos, lower), 0))
    if upper is not None:
        hi = torch.minimum(hi, torch.where(pos_sorted, torch.searchsorted(other_pos, upper, right=True), seq))
    empty = (hi <= lo) | (doc_max == PAD_DOC)
    return torch.where(empty, seq, lo), torch.where(empty, 0, hi)


def plan(q_pos, k_pos, q_doc, k_doc, causal, window, batch, device):
    """(q_pos, q_doc, k_pos, k_doc) as (1 or b, s) int64 and the (1 or b, runs, 8) summaries."""
    coords = [as_batched(c).to(device=device, dtype=torch.int64) for c in (q_pos, q_doc, k_pos, k_doc)]
    rows = max(c.shape[0] for c in coords)
    if rows not in (1, batch):
        raise ValueError(f"coordinates must be (s,) or (batch={batch}, s), got batch {rows}")
    q_pos, q_doc, k_pos, k_doc = (c.expand(rows, -1).contiguous() for c in coords)
    if q_pos.shape != q_doc.shape or k_pos.shape != k_doc.shape:
        raise ValueError("q_pos/q_doc and k_pos/k_doc must have matching shapes")
    qs, ks = _summaries(q_pos, q_doc), _summaries(k_pos, k_doc)
    w = window
    q_lower = None if w is None else qs[0] - w + 1  # keys a query run may see
    q_upper = qs[1] if causal else (None if w is None else qs[1] + w - 1)
    k_lower = ks[0] if causal else (None if w is None else ks[0] - w + 1)  # queries seeing a key run
    k_upper = None if w is None else ks[1] + w - 1
    q_info = _pyramid(torch.stack([*qs, *_spans(qs, k_pos, k_doc, q_lower, q_upper)], -1))
    k_info = _pyramid(torch.stack([*ks, *_spans(ks, q_pos, q_doc, k_lower, k_upper)], -1))
    return q_pos, q_doc, k_pos, k_doc, q_info, k_info


# Per field: how two summaries merge (min or max), and the value that merges as a no-op.
_FIELD_MERGE = ("min", "max", "min", "max", "min", "min", "max")
_FIELD_NEUTRAL = (BIG, -BIG, BIG, PAD_DOC, BIG, BIG, 0)


def _pyramid(runs: torch.Tensor) -> torch.Tensor:
    """(rows, n, 7) run summaries -> (rows, levels, n, 8): level i merges 2**i runs per row
    (a tile of LEVEL_BLOCKS[i] tokens), so a kernel reads its tile's bounds in one row."""
    rows, num_runs, _ = runs.shape
    neutral = torch.tensor(_FIELD_NEUTRAL + (0,), dtype=runs.dtype, device=runs.device)
    out = neutral.expand(rows, len(LEVEL_BLOCKS), num_runs, 8).clone()
    level = runs
    for index in range(len(LEVEL_BLOCKS)):
        out[:, index, : level.shape[1], :7] = level
        if level.shape[1] % 2:
            level = torch.cat([level, neutral[:7].expand(rows, 1, 7)], dim=1)
        pairs = level.view(rows, -1, 2, 7)
        low, high = pairs.amin(2), pairs.amax(2)
        level = torch.stack([(low if m == "min" else high)[..., f] for f, m in enumerate(_FIELD_MERGE)], -1)
    return out


def check_inputs(q, k, v, window):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("triton attention takes q (b, sq, h, d), k and v (b, sk, h_kv, d)")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"triton attention supports float16, bfloat16 and float32 (q, k, v alike), got "
            f"{q.dtype}/{k.dtype}/{v.dtype}; use kernel='torch' for float64"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of K/V heads ({k.shape[2]})")
    if q.shape[3] > 256:
        raise ValueError(f"triton attention supports head dims up to 256, got {q.shape[3]}; use kernel='torch'")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")


def coord_args(q_pos, k_pos, q_info, k_info) -> list[int]:
    """Batch strides of coordinates and summaries (0 when shared by the batch), run counts."""
    shared = q_pos.shape[0] == 1
    return [0 if shared else q_pos.stride(0), 0 if shared else k_pos.stride(0),
            0 if shared else q_info.stride(0), 0 if shared else k_info.stride(0),
            q_info.shape[2], k_info.shape[2]]


def kernel_inputs(interpret: bool, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Last dim contiguous. Under the interpreter bfloat16 runs as float32: Triton 3.x's
    interpreter keeps bf16 as raw uint16 and computes wrong values from it."""
    if interpret and tensors[0].dtype == torch.bfloat16:
        tensors = tuple(t.float() for t in tensors)
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def common_consts(q, seq_q, seq_k, causal, window):
    return {
        "TUNE_SQ": triton.next_power_of_2(max(seq_q, 1)), "TUNE_SK": triton.next_power_of_2(max(seq_k, 1)),
        "CAUSAL": bool(causal), "HAS_WINDOW": window is not None,
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[3])),
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32",
    }


# ---------------------------------------------------------------------------------- forward


def _attn_fwd(Q, K, V, O, LSE, QPOS, QDOC, KPOS, KDOC, QINFO, KINFO,
              s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
              s_cq, s_ck, s_iq, s_ik, num_q_runs, num_k_runs, num_heads, group, seq_q, seq_k,
              head_dim, scale_log2, window, TUNE_SQ, TUNE_SK,
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
    q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qs + h * s_qh + offs_d[None, :],
                mask=in_m[:, None] & in_d[None, :], other=0.0)
    q_pos = tl.load(QPOS + b * s_cq + offs_m, mask=in_m, other=0)
    q_doc = tl.load(QDOC + b * s_cq + offs_m, mask=in_m, other=-1)
    # Bounds of this query tile: one row of the summary pyramid at this block's level.
    qi = QINFO + b * s_iq + (LEVEL_M * num_q_runs + pid_m) * 8
    qp_min, qp_max = tl.load(qi + 0), tl.load(qi + 1)
    qd_min, qd_max, qd_lo = tl.load(qi + 2), tl.load(qi + 3), tl.load(qi + 4)
    kt_lo = (tl.load(qi + 5) // BLOCK_N)
    kt_hi = ((tl.load(qi + 6) + BLOCK_N - 1) // BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
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
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that saw nothing yet keep max -inf: shift by 0 so exp2 gives 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - shift[:, None])
            alpha = tl.math.exp2(m_i - shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * s_ob + offs_m[:, None] * s_os + h * s_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=in_m[:, None] & in_d[None, :])
    tl.store(LSE + pid_bh * seq_q + offs_m, lse, mask=in_m)


FWD_SPEC = (_attn_fwd, FWD_CONFIGS, "BLOCK_N", "BLOCK_M")


def triton_forward(q, k, v, q_pos, k_pos, q_doc, k_doc, causal=True, window=None, scale=None,
                   block_q=None, block_k=None, out_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``blockwise_forward``: out (b, sq, h, d) in q's dtype, lse (b, h, sq)
    float32, -inf (and out 0) for rows that see no key. ``block_q``/``block_k`` fix the tiles
    (powers of two >= 16) instead of autotuning; ``out_dtype`` (e.g. float32) keeps a partial
    output unrounded for a later merge."""
    _require_triton()
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
    qp, qd, kp, kd, q_info, k_info = plan(q_pos, k_pos, q_doc, k_doc, causal, window, batch, q.device)
    scale = default_scale(head_dim, scale)
    args = [q, k, v, result, lse, qp, qd, kp, kd, q_info, k_info,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *result.stride()[:3],
            *coord_args(qp, kp, q_info, k_info), num_heads, num_heads // num_kv_heads, seq_q, seq_k,
            head_dim, scale * LOG2E, window or 0]
    consts = common_consts(q, seq_q, seq_k, causal, window)
    launch(FWD_SPEC, "BLOCK_M", (seq_q, batch * num_heads), args, consts, interpret, block_q, block_k)
    return result.to(out.dtype), lse


def triton_backward(dout, q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc, causal=True, window=None,
                    scale=None, delta=None, block_q=None, block_k=None):
    """Same contract as ``blockwise_backward``: ``lse`` (b, h, sq) may be the merged lse over all
    key blocks; ``delta`` (b, h, sq) = rowsum(dout * out) is computed when None. Returns dq
    (b, sq, h, d), dk and dv (b, sk, h_kv, d) in float32, dk/dv summed over each GQA group."""
    from .triton_attention_bwd import backward

    _require_triton()
    check_inputs(q, k, v, window)
    return backward(dout, q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc, causal, window,
                    default_scale(q.shape[3], scale), delta, block_q, block_k)


class TritonAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: gradients flow through ``out``; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, q_doc, k_doc, causal, window, scale, block_q, block_k):
        out, lse = triton_forward(q, k, v, q_pos, k_pos, q_doc, k_doc, causal, window, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc)
        ctx.settings = (causal, window, scale, block_q, block_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc = ctx.saved_tensors
        causal, window, scale, block_q, block_k = ctx.settings
        dq, dk, dv = triton_backward(dout, q, k, v, out, lse, q_pos, k_pos, q_doc, k_doc, causal, window,
                                     scale, block_q=block_q, block_k=block_k)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 9)


def triton_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, causal=True, window=None, scale=None,
                     block_q=None, block_k=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Triton attention; same contract as ``blockwise_attention``."""
    return TritonAttentionFunction.apply(q, k, v, q_pos, k_pos, q_doc, k_doc, causal, window, scale,
                                         block_q, block_k)


__all__ = ["triton_attention", "triton_backward", "triton_forward", "TritonAttentionFunction"]
