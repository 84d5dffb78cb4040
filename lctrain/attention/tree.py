"""Tree attention: queries travel, K/V stay; partial results combine with tree collectives.

Each of the P ranks holds one shard of the sequence (any layout: masking is by
global coordinates, so gathered queries carry their ``pos`` / ``doc``). Every
rank serves the queries of *every* rank against its own local K/V, and the
softmax over the sequence axis, being an associative log-sum-exp reduction
(Tree Attention, Shyam et al.), is finished with collectives that NCCL and
gloo run as trees or rings.

The local queries are processed in chunks of at most ``query_chunk`` tokens per
rank (None: one chunk), so a rank holds at most P * query_chunk gathered
query tokens at once. All ranks hold shards of the same length, hence the same
chunks.

Forward. Once per call: all-gather the coordinates (pos, doc) of every rank.
Per chunk of c tokens per rank:

1. all-gather the chunk's queries -> (b, P * c, h, d) in group-rank order;
2. local kernel: partial (out_r, lse_r) of those queries against local K/V;
3. all-reduce MAX of lse_r -> m, the same reference on every rank (a row
   that sees no key anywhere has m = -inf; it is shifted by 0 instead);
4. reduce-scatter SUM of [exp(lse_r - m) * out_r, exp(lse_r - m)] packed as
   (b, P * c, h, d + 1) in fp32 (fp64 for fp64 inputs): each owner receives
   the numerator and denominator of its own c tokens only, and finishes
   out = num / den, lse = m + log(den) (out 0 and lse -inf where den = 0).

Backward, per chunk, from the final (merged) lse and delta = rowsum(dout * out)
of the owner: all-gather [q, dout] (packed along heads) and [lse, delta]; the
local kernel gives dq for all gathered queries and dK/dV for the local keys
(summed locally over chunks, fp32/fp64); a reduce-scatter SUM returns to each
owner the dq of its own tokens. ``out`` itself never travels: delta replaces it.

Counters (optional, per rank): ``pairs`` = unmasked (query, key) pairs the
local kernel computed (all gathered queries x local keys), summed over batch
rows, per phase; ``messages`` = collective calls; ``bytes_sent`` = this rank's
share as a ring algorithm sends it (as in allgather.py): an all-gather of a
local part X sends (P - 1) * |X|; a reduce-scatter of a buffer of P slices
sends (P - 1) * |slice|; an all-reduce of B sends 2 (P - 1) / P * |B|. With
n = ceil(s / query_chunk) chunks, e / a the bytes of one input / accumulation
element, r the coordinate rows (1 or b):

- forward:  messages 1 + 3n; bytes (P - 1) * (16 r s + b s h d e + 2 b h s a
            + b s h (d + 1) a);
- backward: messages 3n; bytes (P - 1) * (2 b s h d e + 2 b h s a + b s h d a).

Bytes do not depend on the chunking, only messages do. P == 1 (no group, or a
group of one rank) is the local kernel: no messages, no chunking. All ranks
must pass shards of the same shape (every layout does) and coordinates of the
same form ((s,) everywhere or (b, s) everywhere). Gathered queries sit in
group-rank order, so one kernel query tile may hold several ranks' tokens:
masking stays exact, but tile skipping is coarser than on a single shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain_kernels.reference import accumulation_dtype

from .checks import check_shard_inputs, shard_coords
from .counters import AttentionCounters, tensor_bytes
from .local_kernels import LocalKernel, as_local_kernel
from .place import GroupPlace


class _Tree(GroupPlace):
    """This rank's place in the group, its collectives, and its counters."""

    def _count(self, phase: str, bytes_sent: int) -> None:
        if self.counters is not None:
            self.counters.add(phase, bytes_sent=bytes_sent, messages=1)

    def all_gather(self, phase: str, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in group-rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        self._count(phase, (self.size - 1) * tensor_bytes(x))
        return torch.cat(parts, dim=dim)

    def all_reduce_max(self, phase: str, x: torch.Tensor) -> torch.Tensor:
        """Element-wise max over ranks, in a new tensor (``x`` is left as it is)."""
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        self._count(phase, 2 * (self.size - 1) * tensor_bytes(x) // self.size)
        return x

    def reduce_scatter(self, phase: str, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum ``x`` over ranks; keep slice number ``rank`` of P equal slices along ``dim``."""
        slices = [part.contiguous() for part in x.chunk(self.size, dim=dim)]
        mine = torch.empty_like(slices[0])
        dist.reduce_scatter(mine, slices, group=self.group)
        self._count(phase, (self.size - 1) * tensor_bytes(mine))
        return mine



def _chunks(seq_len: int, query_chunk: int | None) -> list[tuple[int, int]]:
    step = seq_len if query_chunk is None else query_chunk
    return [(start, min(start + step, seq_len)) for start in range(0, seq_len, max(step, 1))]


def _chunk_coords(coords_all: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(P, 2, rows, s) coordinates of every rank -> (2, rows, P * (end - start)) for one chunk."""
    num_ranks, _, rows, _ = coords_all.shape
    chunk = coords_all[..., start:end].permute(1, 2, 0, 3)
    return chunk.reshape(2, rows, num_ranks * (end - start))


class TreeAttentionFunction(torch.autograd.Function):
    """Differentiable tree attention over local shards; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, q_doc, tree, causal, window, scale, query_chunk):
        batch = q.shape[0]
        if tree.size == 1:
            out, lse = tree.kernel.forward(q, k, v, q_pos, q_pos, q_doc, q_doc, causal, window, scale)
            tree.count_pairs("forward", q_pos, q_pos, q_doc, q_doc, causal, window, batch)
            ctx.save_for_backward(q, k, v, out, lse, q_pos, q_doc, None)
            ctx.settings = (tree, causal, window, scale, query_chunk)
            ctx.mark_non_differentiable(lse)
            return out, lse

        acc_dtype = accumulation_dtype(q.dtype)
        coords = torch.stack([q_pos, q_doc])  # (2, rows, s)
        coords_all = tree.all_gather("forward", coords.unsqueeze(0), dim=0)  # (P, 2, rows, s)
        out = q.new_empty(q.shape)
        lse = q.new_empty((batch, q.shape[2], q.shape[1]), dtype=acc_dtype)
        for start, end in _chunks(q.shape[1], query_chunk):
            q_all = tree.all_gather("forward", q[:, start:end], dim=1)  # (b, P * c, h, d)
            pos_all, doc_all = _chunk_coords(coords_all, start, end)
            out_part, lse_part = tree.kernel.forward(
                q_all, k, v, pos_all, q_pos, doc_all, q_doc, causal, window, scale, out_dtype=acc_dtype
            )
            tree.count_pairs("forward", pos_all, q_pos, doc_all, q_doc, causal, window, batch)
            lse_max = tree.all_reduce_max("forward", lse_part)  # (b, h, P * c)
            # Rows that see no key anywhere keep max -inf: shift them by 0 so the
            # weights are exp(-inf) = 0 rather than exp(-inf - -inf) = NaN.
            shift = torch.where(lse_max == float("-inf"), 0.0, lse_max)
            weight = torch.exp(lse_part - shift).transpose(1, 2).unsqueeze(-1)  # (b, P * c, h, 1)
            packed = torch.cat([out_part.to(acc_dtype) * weight, weight], dim=-1)
            mine = tree.reduce_scatter("forward", packed, dim=1)  # (b, c, h, d + 1): own tokens
            num, den = mine[..., :-1], mine[..., -1]
            seen = den > 0
            out[:, start:end] = (num / torch.where(seen, den, 1.0).unsqueeze(-1)).to(q.dtype)
            own_shift = shift.chunk(tree.size, dim=-1)[tree.rank]
            own_lse = torch.where(seen, torch.log(torch.where(seen, den, 1.0)), float("-inf"))
            lse[:, :, start:end] = own_shift + own_lse.transpose(1, 2)

        ctx.save_for_backward(q, k, v, out, lse, q_pos, q_doc, coords_all)
        ctx.settings = (tree, causal, window, scale, query_chunk)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_pos, q_doc, coords_all = ctx.saved_tensors
        tree, causal, window, scale, query_chunk = ctx.settings
        batch, num_heads = q.shape[0], q.shape[2]
        if tree.size == 1:
            dq, dk, dv = tree.kernel.backward(
                dout, q, k, v, out, lse, q_pos, q_pos, q_doc, q_doc, causal, window, scale
            )
            tree.count_pairs("backward", q_pos, q_pos, q_doc, q_doc, causal, window, batch)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 7)

        acc_dtype = accumulation_dtype(q.dtype)
        delta = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1).transpose(1, 2)  # (b, h, s)
        dq = q.new_empty(q.shape, dtype=acc_dtype)
        dk = k.new_zeros(k.shape, dtype=acc_dtype)
        dv = v.new_zeros(v.shape, dtype=acc_dtype)
        for start, end in _chunks(q.shape[1], query_chunk):
            q_dout = torch.cat([q[:, start:end], dout[:, start:end].to(q.dtype)], dim=2)
            q_all, dout_all = tree.all_gather("backward", q_dout, dim=1).split(num_heads, dim=2)
            stats = torch.stack([lse[:, :, start:end], delta[:, :, start:end]])  # (2, b, h, c)
            lse_all, delta_all = tree.all_gather("backward", stats, dim=-1)
            pos_all, doc_all = _chunk_coords(coords_all, start, end)
            dq_part, dk_part, dv_part = tree.kernel.backward(
                dout_all, q_all, k, v, None, lse_all, pos_all, q_pos, doc_all, q_doc,
                causal, window, scale, delta=delta_all,
            )
            tree.count_pairs("backward", pos_all, q_pos, doc_all, q_doc, causal, window, batch)
            dk += dk_part
            dv += dv_part
            dq[:, start:end] = tree.reduce_scatter("backward", dq_part, dim=1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 7)


def tree_peak_query_tokens(seq_local: int, num_ranks: int, query_chunk: int | None = None) -> int:
    """Gathered query tokens a rank holds at once: P x (tokens per chunk); the local shard if P == 1."""
    per_rank = seq_local if query_chunk is None else min(query_chunk, seq_local)
    return num_ranks * per_rank if num_ranks > 1 else seq_local


def tree_peak_bytes(
    batch: int, seq_local: int, num_heads: int, head_dim: int, num_ranks: int,
    query_chunk: int | None = None, dtype: torch.dtype = torch.float32,
) -> dict[str, int]:
    """Bytes of the per-chunk buffers over gathered queries that tree attention holds at once.

    Counts the tensors this module allocates per chunk of t = P x c gathered
    tokens (not the local kernel's own temporaries, nor the local shards):
    forward: gathered q (e), partial out (e) and lse (a), max (a), packed
    numerator/denominator (a, d + 1 per head); backward: gathered q and dout
    (e), lse and delta (a), partial dq (a). e / a: bytes of one ``dtype`` /
    accumulation element. Linear in ``query_chunk``; 0 when P == 1.
    """
    if num_ranks == 1:
        return {"forward": 0, "backward": 0}
    tokens = tree_peak_query_tokens(seq_local, num_ranks, query_chunk)
    elem = torch.finfo(dtype).bits // 8
    acc = torch.finfo(accumulation_dtype(dtype)).bits // 8
    rows = batch * tokens * num_heads  # one (token, head) row of every gathered query
    forward = rows * (2 * head_dim * elem + 2 * acc + (head_dim + 1) * acc)
    backward = rows * (2 * head_dim * elem + 2 * acc + head_dim * acc)
    return {"forward": forward, "backward": backward}


def tree_attention(
    q, k, v, q_pos, q_doc=None, group=None, causal=True, window=None, scale=None,
    counters: AttentionCounters | None = None, query_chunk: int | None = None,
    kernel: LocalKernel | str | None = None,
):
    """Tree attention of this rank's shards. Returns (out (b, s_local, h, d), lse (b, h, s_local)).

    q (b, s_local, h, d), k / v (b, s_local, h_kv, d) with h % h_kv == 0: this
    rank's tokens. ``q_pos`` / ``q_doc``: their global positions and document
    ids, (s_local,) or (b, s_local); they describe the local K/V too. ``q_doc``
    None means one document; -1 marks padding. ``group``: the context-parallel
    process group (None: the default group, or the local kernel if
    torch.distributed is not initialised). ``query_chunk``: most local query
    tokens per rank gathered at once (None: the whole shard), bounding peak
    memory at P x query_chunk gathered tokens. ``counters`` receives pairs,
    bytes and messages per phase; ``kernel``: the local kernel. lse is float32 (float64 for float64 inputs),
    -inf on rows that see no key.
    """
    if q_doc is None:
        q_doc = torch.zeros_like(q_pos)
    check_shard_inputs(q, k, v, q_pos, q_doc, window)
    if query_chunk is not None and (isinstance(query_chunk, bool) or not isinstance(query_chunk, int)
                                    or query_chunk < 1):
        raise ValueError(f"query_chunk must be a positive number of tokens or None, got {query_chunk!r}")
    q_pos, q_doc = shard_coords(q, q_pos, q_doc)
    tree = _Tree(group, counters, as_local_kernel(kernel, q))
    return TreeAttentionFunction.apply(q, k, v, q_pos, q_doc, tree, causal, window, scale, query_chunk)
