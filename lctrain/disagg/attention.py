"""DisaggAttention: the model's attention slot backed by attention servers (cp=disagg).

Each data-parallel worker passes its own full packed batch. Padding tokens (doc -1)
are dropped and every batch row's documents become the worker's document list, so the
servers see only real work; outputs come back scattered into place (padding: out 0,
lse -inf, like the reference). A call is three steps so that two half-batches can
interleave (ping-pong): ``start`` (control + post requests), ``serve`` (server
role: compute what arrived, post results) and ``complete`` (collect results, as an
autograd Function whose backward is one synchronous exchange of dout, lse and delta).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lctrain.attention.checks import check_coords, check_qkv
from lctrain_kernels.mask import CAUSAL, PAD_DOC, Coords, Mask
from lctrain_kernels.reference import accumulation_dtype

from .protocol import BACKWARD, FORWARD, CallSpec
from .runtime import DisaggRuntime


@dataclass
class Packing:
    """Which tokens of the (b, s) batch are real, as the worker's document list."""

    index: torch.Tensor  # (n,) indices into the flattened b * s tokens, in order
    lengths: list[int]  # documents in order, none crossing a batch row
    batch: int
    seq: int


def pack_tokens(coords: Coords, batch: int, seq: int) -> Packing:
    """Document runs of every row; ValueError unless each run has consecutive positions."""
    doc = coords.doc_ids.cpu().long().expand(batch, seq)
    pos = coords.token_pos.cpu().long().expand(batch, seq)
    same = doc[:, 1:] == doc[:, :-1]
    if bool((same & (doc[:, 1:] != PAD_DOC) & (pos[:, 1:] - pos[:, :-1] != 1)).any()):
        raise ValueError("disagg attention needs consecutive positions inside each document "
                         "(tasks address documents as token ranges); pass the packed sequence unsharded")
    starts = torch.ones(batch, seq, dtype=torch.bool)
    starts[:, 1:] = ~same
    flat_doc, flat_start = doc.reshape(-1), starts.reshape(-1)
    run_starts = flat_start.nonzero().flatten().tolist() + [batch * seq]
    lengths, seen = [], set()
    for first, end in zip(run_starts, run_starts[1:]):
        row, doc_id = first // seq, int(flat_doc[first])
        if doc_id == PAD_DOC:
            continue
        if (row, doc_id) in seen:
            raise ValueError(f"document {doc_id} of batch row {row} is split into several runs; documents "
                             f"must be contiguous (repack the sequence)")
        seen.add((row, doc_id))
        lengths.append(end - first)
    index = (flat_doc != PAD_DOC).nonzero().flatten()
    return Packing(index, lengths, batch, seq)


@dataclass
class PendingCall:
    """A forward call posted by ``start``; ``complete`` turns it into out (and lse)."""

    attention: "DisaggAttention"
    call: object
    packing: Packing
    spec: CallSpec
    served: bool = False


class DisaggAttentionFunction(torch.autograd.Function):
    """Forward collects a posted call's results; backward sends dout to the servers."""

    @staticmethod
    def forward(ctx, q, k, v, pending: PendingCall):
        out, lse = _collect_forward(pending, q)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pending = pending
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _exchange_backward(ctx.pending, q, k, v, out, lse, dout)
        return dq, dk, dv, None


def _compact(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    return x.reshape(packing.batch * packing.seq, *x.shape[2:])[packing.index]


def _collect_forward(pending: PendingCall, q: torch.Tensor):
    p, s = pending.packing, pending.spec
    if not pending.served:
        pending.attention.serve(pending)
    out_c = q.new_zeros(len(p.index), s.num_heads, s.head_dim)
    lse_c = torch.full((s.num_heads, len(p.index)), float("-inf"), dtype=accumulation_dtype(q.dtype))
    for item, (out, lse) in pending.call.results():
        t = item.task
        out_c[t.q_start:t.q_end] = out
        lse_c[:, t.q_start:t.q_end] = lse
    out = q.new_zeros(p.batch * p.seq, s.num_heads, s.head_dim)
    out[p.index] = out_c
    lse = lse_c.new_full((s.num_heads, p.batch * p.seq), float("-inf"))
    lse[:, p.index] = lse_c
    return out.view(p.batch, p.seq, s.num_heads, s.head_dim), lse.view(s.num_heads, p.batch, p.seq).transpose(0, 1)


def _exchange_backward(pending: PendingCall, q, k, v, out, lse, dout):
    p, rt = pending.packing, pending.attention.runtime
    acc = accumulation_dtype(q.dtype)
    spec = replace(pending.spec, op=BACKWARD, slot=0)
    lse_c = lse.transpose(0, 1).reshape(lse.shape[1], -1)[:, p.index]
    dout_c = _compact(dout, p)
    delta_c = (dout_c.to(acc) * _compact(out, p).to(acc)).sum(-1).transpose(0, 1).contiguous()
    tensors = {"q": _compact(q, p), "k": _compact(k, p), "v": _compact(v, p), "dout": dout_c.to(q.dtype),
               "lse": lse_c.contiguous(), "delta": delta_c}
    call = rt.begin(spec, p.lengths, tensors)
    call.serve()
    grads = [torch.zeros(len(p.index), *x.shape[2:], dtype=acc) for x in (q, k, v)]
    for item, (dq_t, dk_t, dv_t) in call.results():
        t = item.task
        grads[0][t.q_start:t.q_end] += dq_t
        grads[1][t.kv_start:t.kv_end] += dk_t  # key ranges of one document's tasks overlap: sum
        grads[2][t.kv_start:t.kv_end] += dv_t
    full = []
    for g, x in zip(grads, (q, k, v)):
        g_full = torch.zeros(p.batch * p.seq, *x.shape[2:], dtype=x.dtype)
        g_full[p.index] = g.to(x.dtype)
        full.append(g_full.view(x.shape))
    return full


class DisaggAttention:
    """Same call contract (and trainer hooks) as the other attention callables, on each worker's
    own full batch. ``ping_pong``: the model runs two half-batches interleaved layer by layer
    (``interleaves_halves``) through ``start`` / ``serve`` / ``complete``."""

    strategy = "disagg"

    def __init__(self, runtime: DisaggRuntime, ping_pong: bool = False):
        self.runtime = runtime
        self.counters = runtime.counters
        self.interleaves_halves = ping_pong

    def __repr__(self) -> str:
        return f"DisaggAttention({self.runtime!r})"

    def begin_step(self) -> None:
        """Nothing to re-arm: every call's control exchange checks the workers agree."""

    def step_metrics(self) -> dict[str, float]:
        """The last plan's predicted balance next to what no servers would give."""
        return self.runtime.plan_stats()

    def start(self, q, k, v, coords: Coords | None = None, mask: Mask = CAUSAL, scale=None,
              slot: int = 0) -> PendingCall:
        """Control exchange and post the requests; the caller may compute until ``complete``."""
        if not self.runtime.is_worker:
            raise ValueError(f"rank {self.runtime.rank} is a dedicated attention server; it runs serve(), "
                             f"not the model")
        check_qkv(q, k, v)
        coords = Coords.of_sequence(q.shape[1]) if coords is None else coords
        check_coords(coords, q.shape[0], q.shape[1])
        if q.device.type != "cpu":
            raise ValueError("disagg attention runs on CPU tensors in this version (gloo all-to-all)")
        packing = pack_tokens(coords, q.shape[0], q.shape[1])
        spec = CallSpec(FORWARD, slot, mask.causal, mask.window, scale, q.shape[2], k.shape[2], q.shape[3], q.dtype)
        tensors = {name: _compact(x.detach(), packing) for name, x in (("q", q), ("k", k), ("v", v))}
        call = self.runtime.begin(spec, packing.lengths, tensors)
        return PendingCall(self, call, packing, call.spec)

    def serve(self, pending: PendingCall) -> None:
        """Server role of a posted call (a no-op compute on pure workers, which only post receives)."""
        pending.call.serve()
        pending.served = True

    def complete(self, pending: PendingCall, q, k, v, return_lse: bool = False):
        out, lse = DisaggAttentionFunction.apply(q, k, v, pending)
        return (out, lse) if return_lse else out

    def __call__(self, q, k, v, coords: Coords | None = None, mask: Mask = CAUSAL, scale=None, return_lse=False):
        """q (b, s, h, d), k / v (b, s, h_kv, d): this worker's batch -> out (b, s, h, d) [, lse (b, h, s)]."""
        pending = self.start(q, k, v, coords, mask, scale)
        return self.complete(pending, q, k, v, return_lse)

    def finish(self) -> None:
        """Release the servers (every worker calls it once, after its last attention call)."""
        self.runtime.stop()


def serve(attention: DisaggAttention | DisaggRuntime) -> int:
    """Dedicated server loop: answer FORWARD/BACKWARD calls until the workers send STOP.

    Returns the number of calls served.
    """
    rt = attention.runtime if isinstance(attention, DisaggAttention) else attention
    if rt.is_worker:
        raise ValueError(f"rank {rt.rank} is a worker; only dedicated server ranks run serve()")
    calls = 0
    try:
        while True:
            call = rt.begin(None, None, None)
            if call.op not in (FORWARD, BACKWARD):
                for slot in range(len(rt.slots)):
                    rt.settle_slot(slot)
                return calls
            call.serve()
            calls += 1
    except Exception:
        rt.announce_abort()  # a no-op unless this server aborted a call
        raise
