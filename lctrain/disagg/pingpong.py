"""Ping-pong execution: two half-batches layer by layer, so one half's attention traffic
overlaps the other half's projections and MLP (DistCA's nano-batch overlap).

Per layer, with halves A and B (slots 0 and 1, each with its own process group):

    serve A, serve B                      server role: compute what arrived, post results
    complete A, A's wo + MLP, A's next-layer qkv, start A (post requests)
    complete B, B's wo + MLP, B's next-layer qkv, start B

so A's request transfer runs under B's MLP and qkv, B's request transfer under A's
server compute, and each half's result transfer under the other half's work. The
halves are batch rows, or for one row the two sides of the document boundary closest
to the middle (attention never crosses it, so the result is exact). Only the forward
overlaps: each attention backward is one synchronous exchange, ordered by autograd.
"""

from __future__ import annotations

import torch

from lctrain.models.llama import Llama, rope_cos_sin


def split_point(doc_ids: torch.Tensor) -> tuple[int, int] | None:
    """(dim, index) splitting a (b, s) batch into two attention-independent halves, or None."""
    batch, seq = doc_ids.shape
    if batch >= 2:
        return 0, batch // 2
    boundaries = (doc_ids[0, 1:] != doc_ids[0, :-1]).nonzero().flatten() + 1
    if len(boundaries) == 0:
        return None
    return 1, int(boundaries[(boundaries - seq / 2).abs().argmin()])


def pingpong_forward(model: Llama, attention, input_ids, position_ids, doc_ids, token_pos=None) -> torch.Tensor:
    """Final hidden states, as ``model(input_ids, position_ids, doc_ids, token_pos)`` computes them."""
    where = split_point(doc_ids)
    if where is None or model.activation_checkpointing and model.training:
        return model(input_ids, position_ids, doc_ids, token_pos)
    dim, cut = where
    if token_pos is None:
        token_pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)

    def halves(t):
        return list(t.split([cut, t.shape[dim] - cut], dim=dim))

    x = model.embed(input_ids)
    cos, sin = rope_cos_sin(position_ids, model.shape.head_dim, model.shape.rope_theta, x.dtype)
    xs, coss, sins, docs, poss = halves(x), halves(cos), halves(sin), halves(doc_ids), halves(token_pos)
    pending, qkv = [None, None], [None, None]

    def start(i, block):
        qkv[i] = block.attn.project_qkv(block.attn_norm(xs[i]), coss[i], sins[i])
        pending[i] = attention.start(*qkv[i], causal=True, doc_ids=docs[i], positions=poss[i], slot=i)

    def finish(i, block):
        out = attention.complete(pending[i], *qkv[i])
        h = xs[i] + block.attn.wo(out.reshape(*xs[i].shape[:2], -1))
        xs[i] = h + block.mlp(block.mlp_norm(h))

    layers = list(model.layers)
    for i in (0, 1):
        start(i, layers[0])
    for index, block in enumerate(layers):
        for i in (0, 1):
            attention.serve(pending[i])
        for i in (0, 1):
            finish(i, block)
            if index + 1 < len(layers):
                start(i, layers[index + 1])
    return model.norm(torch.cat(xs, dim=dim))


def exposed_transfer_fraction(timers_sync: dict, timers_pingpong: dict) -> float:
    """Share of the synchronous run's blocked transfer time still blocking with ping-pong."""
    return timers_pingpong.get("wait_s", 0.0) / max(timers_sync.get("wait_s", 0.0), 1e-12)
