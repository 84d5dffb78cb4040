"""One rank's part of a context-parallel exactness case, shared by the strategy tests."""

from __future__ import annotations

from lctrain.attention import AttentionCounters, Coords, Mask


def run_sharded(attention, layout, index, q, k, v, dout, doc, causal, window) -> dict:
    """Run ``attention`` (groups already bound) on shard ``index`` of full q/k/v and doc ids,
    backpropagate the shard of ``dout``; returns out, lse, dq, dk, dv and the per-phase counters."""
    seq_len = q.shape[1]
    q, k, v = (layout.shard(x, index, dim=1).requires_grad_() for x in (q, k, v))
    counters = AttentionCounters()
    coords = Coords(layout.positions(seq_len, index), layout.shard(doc, index, dim=-1))
    out, lse = attention(q, k, v, coords, mask=Mask(causal, window), counters=counters)
    out.backward(layout.shard(dout, index, dim=1))
    return dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad, phases=counters.per_phase)


def reference_results(q, k, v, dout, causal, doc, window) -> dict:
    """out, lse, dq, dk, dv of ``reference_attention`` on the full tensors."""
    from lctrain.attention.reference import reference_attention

    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = reference_attention(q, k, v, causal=causal, doc_ids=doc, window=window)
    out.backward(dout)
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def assert_unsharded_close(per_rank: list, layout, expected: dict, tol: float) -> None:
    """Each rank's shards, unsharded by ``layout``, equal ``expected`` (dtype, shape, no NaN)."""
    import torch

    for name in ("out", "lse", "dq", "dk", "dv"):
        got = layout.unshard([r[name] for r in per_rank], dim=2 if name == "lse" else 1)
        assert got.dtype == expected[name].dtype, name
        assert got.shape == expected[name].shape, name
        assert not got.isnan().any(), f"{name} has NaN"
        torch.testing.assert_close(got, expected[name], atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def count_visible_pairs(q_pos, k_pos, q_doc, k_doc, causal, window) -> int:
    """The dense reference count: the mask rule's (sq, sk) mask summed over coordinate rows
    (what the strategies' counters, computed by binary search, must equal)."""
    from lctrain_kernels.mask import visible_mask

    return int(visible_mask(Coords(q_pos, q_doc), Coords(k_pos, k_doc), Mask(causal, window)).sum())
