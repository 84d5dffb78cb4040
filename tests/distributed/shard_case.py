"""One rank's part of a context-parallel exactness case, shared by the strategy tests."""

from __future__ import annotations

from lctrain.attention.counters import AttentionCounters


def run_sharded(attention, layout, index, q, k, v, dout, doc, causal, window) -> dict:
    """Run ``attention`` (groups already bound) on shard ``index`` of full q/k/v and doc ids,
    backpropagate the shard of ``dout``; returns out, lse, dq, dk, dv and the per-phase counters."""
    seq_len = q.shape[1]
    q, k, v = (layout.shard(x, index, dim=1).requires_grad_() for x in (q, k, v))
    counters = AttentionCounters()
    out, lse = attention(q, k, v, layout.positions(seq_len, index), layout.shard(doc, index, dim=-1),
                         causal=causal, window=window, counters=counters)
    out.backward(layout.shard(dout, index, dim=1))
    return dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad, phases=counters.per_phase)
