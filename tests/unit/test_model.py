"""The single-device Llama: shapes, GQA, tied embeddings, chunked loss, packing, RoPE, checkpointing."""

import math

import pytest
import torch
import torch.nn.functional as F

from lctrain.attention import build_attention, reference_attention
from lctrain.models.llama import Llama, LlamaShape, RMSNorm, apply_rope
from lctrain.models.loss import chunked_cross_entropy
from lctrain.models.rope import rope_cos_sin as scaled_cos_sin
from lctrain.models.rope import rope_frequencies

F64 = torch.float64


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """Plain RoPE's cos / sin (no scaling)."""
    return scaled_cos_sin(position_ids, rope_frequencies(head_dim, theta)[0], dtype)


def small_shape(**overrides):
    base = dict(vocab_size=37, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48)
    base.update(overrides)
    return LlamaShape(**base)


def make_model(core=None, seed=0, dtype=F64, **overrides):
    torch.manual_seed(seed)
    core = core if core is not None else build_attention(strategy="none", kernel="torch")
    ac = overrides.pop("activation_checkpointing", False)
    return Llama(small_shape(**overrides), core, activation_checkpointing=ac).to(dtype)


def reference_core(q, k, v, coords, mask):
    """Dense exact attention; valid when positions are arange (reference_attention's convention)."""
    assert torch.equal(coords.token_pos.reshape(-1, q.shape[1])[0], torch.arange(q.shape[1]))
    return reference_attention(q, k, v, causal=mask.causal, doc_ids=coords.doc_ids, window=mask.window)[0]


def inputs(batch, seq, vocab=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    pos = torch.arange(seq).expand(batch, seq)
    docs = torch.zeros(batch, seq, dtype=torch.long)
    return ids, pos, docs


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_forward_shapes_mha_gqa(num_heads, num_kv_heads):
    model = make_model(num_heads=num_heads, num_kv_heads=num_kv_heads)
    attn = model.layers[0].attn
    assert attn.wq.weight.shape == (32, 32)
    assert attn.wk.weight.shape == (num_kv_heads * 8, 32)
    assert attn.wv.weight.shape == (num_kv_heads * 8, 32)
    ids, pos, docs = inputs(2, 19)
    hidden = model(ids, pos, docs)
    assert hidden.shape == (2, 19, 32) and hidden.dtype == F64
    assert torch.isfinite(hidden).all()
    # The blockwise kernel and the dense reference agree inside the full model.
    model.set_core_attention(reference_core)
    torch.testing.assert_close(model(ids, pos, docs), hidden, atol=1e-10, rtol=1e-10)


def test_tied_vs_untied_embeddings():
    tied = make_model(tie_embeddings=True)
    untied = make_model(tie_embeddings=False)
    assert tied.lm_head is None and tied.output_weight is tied.embed.weight
    assert untied.lm_head is not None and untied.output_weight is untied.lm_head.weight
    assert untied.output_weight is not untied.embed.weight
    assert untied.output_weight.shape == (37, 32)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(untied) - count(tied) == 37 * 32
    ids, pos, docs = inputs(1, 7)
    hidden = untied(ids, pos, docs)
    mask = torch.ones(1, 7, dtype=torch.bool)
    torch.testing.assert_close(untied.logits_at(hidden, mask), untied.lm_head(hidden[0]))


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(dim=30, num_heads=4), "num_heads"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(dim=12, num_heads=4, num_kv_heads=2), "even head_dim"),
    ],
)
def test_invalid_shapes_raise(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        Llama(small_shape(**overrides), build_attention(strategy="none", kernel="torch"))


def test_set_core_attention_reaches_every_layer():
    model = make_model(num_layers=3)
    inner = build_attention(strategy="none", kernel="torch")
    calls = []

    def counting(q, k, v, coords, mask):
        calls.append((q.shape, k.shape, mask.causal))
        return inner(q, k, v, coords, mask)

    ids, pos, docs = inputs(2, 9)
    before = model(ids, pos, docs)
    model.set_core_attention(counting)
    after = model(ids, pos, docs)
    assert len(calls) == 3
    assert all(c == ((2, 9, 4, 8), (2, 9, 2, 8), True) for c in calls)
    assert all(block.attn.core is counting for block in model.layers)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_logits_at_matches_full_logits():
    model = make_model()
    ids, pos, docs = inputs(2, 11)
    hidden = model(ids, pos, docs)
    mask = torch.rand(2, 11, generator=torch.Generator().manual_seed(3)) < 0.4
    mask[0, 0] = True
    full = hidden @ model.embed.weight.T  # tied: the embedding matrix is the output layer
    logits = model.logits_at(hidden, mask)
    assert logits.shape == (int(mask.sum()), 37)
    torch.testing.assert_close(logits, full[mask], atol=1e-12, rtol=1e-12)
    # Low-precision hidden states give fp32 logits.
    model32 = make_model(dtype=torch.float32)
    h32 = model32(ids, pos, docs)
    assert model32.logits_at(h32, mask).dtype == torch.float32


@pytest.mark.parametrize("chunk", [1, 5, 8, 19, 38, 1000])  # 38 tokens: 5, 8 leave a partial chunk
def test_chunked_cross_entropy_matches_full(chunk):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 19, 16, dtype=F64, generator=g, requires_grad=True)
    weight = torch.randn(29, 16, dtype=F64, generator=g, requires_grad=True)
    labels = torch.randint(0, 29, (2, 19), generator=g)
    labels[0, :3] = -100
    labels[1, 11] = -100
    labels[1, -1] = -100

    loss = chunked_cross_entropy(hidden, weight, labels, chunk)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))

    full = F.cross_entropy(
        (hidden @ weight.T).reshape(-1, 29), labels.reshape(-1), reduction="sum", ignore_index=-100
    )
    rh, rw = torch.autograd.grad(full, (hidden, weight))
    torch.testing.assert_close(loss, full, atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(gh, rh, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gw, rw, atol=1e-12, rtol=1e-10)
    # Ignored tokens contribute neither loss nor gradient.
    assert gh[0, :3].abs().max() == 0 and gh[1, 11].abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, chunk), full)


def test_chunked_cross_entropy_low_precision_sums_in_fp32():
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(33, 16, generator=g).to(torch.bfloat16)
    weight = torch.randn(29, 16, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 29, (33,), generator=g)
    loss = chunked_cross_entropy(hidden, weight, labels, 10)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_packed_documents_are_independent(num_kv_heads):
    # Proves the doc mask end to end; RoPE being relative, the in-document positions
    # are checked on q/k directly in test_rope_uses_position_ids_and_core_gets_token_pos.
    model = make_model(num_kv_heads=num_kv_heads)
    g = torch.Generator().manual_seed(11)
    len_a, len_b = 13, 10
    doc_a = torch.randint(0, 37, (len_a,), generator=g)
    doc_b = torch.randint(0, 37, (len_b,), generator=g)

    ids = torch.cat([doc_a, doc_b])[None]
    position_ids = torch.cat([torch.arange(len_a), torch.arange(len_b)])[None]
    doc_ids = torch.cat([torch.zeros(len_a), torch.ones(len_b)]).long()[None]
    token_pos = torch.arange(len_a + len_b)[None]
    packed = model(ids, position_ids, doc_ids, token_pos)

    def alone(doc):
        n = doc.numel()
        return model(doc[None], torch.arange(n)[None], torch.zeros(1, n, dtype=torch.long),
                     torch.arange(n)[None])[0]

    torch.testing.assert_close(packed[0, len_a:], alone(doc_b), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(packed[0, :len_a], alone(doc_a), atol=1e-10, rtol=1e-10)
    # Without the document boundary B would see A: the check above is not vacuous.
    one_doc = model(ids, torch.arange(len_a + len_b)[None], torch.zeros_like(doc_ids), token_pos)
    assert (one_doc[0, len_a:] - alone(doc_b)).abs().max() > 1e-4


def test_rope_uses_position_ids_and_core_gets_token_pos():
    """RoPE is relative, so outputs cannot tell in-document from global positions: check q/k."""
    inner = build_attention(strategy="none", kernel="torch")
    seen = []

    def capture(q, k, v, coords, mask):
        seen.append((q, k, coords.doc_ids, coords.token_pos))
        return inner(q, k, v, coords, mask)

    model = make_model(core=capture, num_layers=1)
    ids = torch.randint(0, 37, (1, 12))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    doc_ids = torch.cat([torch.zeros(5), torch.ones(7)]).long()[None]
    token_pos = torch.arange(100, 112)[None]  # global coordinates of a shard
    model(ids, position_ids, doc_ids, token_pos)
    (q, k, docs_seen, pos_seen), = seen
    assert torch.equal(docs_seen, doc_ids) and torch.equal(pos_seen, token_pos)
    attn = model.layers[0].attn
    x = model.layers[0].attn_norm(model.embed(ids))
    cos, sin = rope_cos_sin(position_ids, 8, 10000.0, F64)
    q_ref = apply_rope(attn.wq(x).view(1, 12, 4, 8), cos, sin)
    k_ref = apply_rope(attn.wk(x).view(1, 12, 2, 8), cos, sin)
    torch.testing.assert_close(q, q_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(k, k_ref, atol=1e-12, rtol=1e-12)


def test_rope_matches_explicit_pair_rotation():
    head_dim, theta = 8, 500.0
    pos = torch.tensor([[0, 1, 7, 100]])
    cos, sin = rope_cos_sin(pos, head_dim, theta, F64)
    x = torch.randn(1, 4, 3, head_dim, dtype=F64)
    got = apply_rope(x, cos, sin)
    half = head_dim // 2
    for t, p in enumerate(pos[0].tolist()):
        for i in range(half):  # rotate-half: pair (i, i + d/2) turns by p * theta^(-2i/d)
            angle = p * theta ** (-2 * i / head_dim)
            a, b = x[0, t, :, i], x[0, t, :, i + half]
            torch.testing.assert_close(got[0, t, :, i], a * math.cos(angle) - b * math.sin(angle))
            torch.testing.assert_close(got[0, t, :, i + half], b * math.cos(angle) + a * math.sin(angle))


def test_rope_preserves_norms_and_position_zero():
    pos = torch.randint(1, 100_000, (2, 16))
    pos[1, 3] = 0
    cos, sin = rope_cos_sin(pos, 32, 10000.0, F64)
    assert cos.shape == sin.shape == (2, 16, 1, 32) and cos.dtype == F64
    x = torch.randn(2, 16, 3, 32, dtype=F64)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y[1, 3], x[1, 3], atol=0, rtol=0)  # position 0: identity
    assert (y - x).abs().max() > 1e-3


def test_rope_dot_product_depends_only_on_offset():
    head_dim = 16
    q = torch.randn(head_dim, dtype=F64)
    k = torch.randn(head_dim, dtype=F64)

    def score(m, n):
        cos, sin = rope_cos_sin(torch.tensor([[m, n]]), head_dim, 10000.0, F64)
        qk = torch.stack([q, k])[None, :, None, :]
        rq, rk = apply_rope(qk, cos, sin)[0, :, 0]
        return torch.dot(rq, rk).item()

    for m, n in [(5, 2), (2, 5), (0, 0), (9, 9), (40, 3)]:
        for shift in (1, 17, 1000):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-10)
    assert abs(score(5, 2) - score(5, 3)) > 1e-6


def test_rmsnorm_normalises_and_scales():
    norm = RMSNorm(12, eps=1e-5).to(F64)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 12, dtype=F64))
    x = 7 * torch.randn(3, 5, 12, dtype=F64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-12, rtol=1e-12)
    xb = x.to(torch.bfloat16)
    yb = RMSNorm(12, eps=1e-5)(xb)
    torch.testing.assert_close(yb.float(), (expected / norm.weight).float(), atol=3e-2, rtol=3e-2)


def test_activation_checkpointing_same_loss_and_grads():
    ids, pos, docs = inputs(2, 17, seed=5)
    docs[:, 9:] = 1
    pos = torch.cat([torch.arange(9), torch.arange(8)]).expand(2, 17)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100

    inner = build_attention(strategy="none", kernel="torch")
    results = []
    for ac in (False, True):
        calls = []

        def counting(*args, **kwargs):
            calls.append(1)
            return inner(*args, **kwargs)

        model = make_model(core=counting, seed=3, activation_checkpointing=ac, num_layers=3)
        model.train()
        hidden = model(ids, pos, docs, torch.arange(17).expand(2, 17))
        loss = chunked_cross_entropy(hidden, model.output_weight, labels, 6)
        loss.backward()
        # Checkpointed blocks recompute their forward (attention included) in backward.
        assert len(calls) == (6 if ac else 3)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))

    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, atol=1e-12, rtol=1e-12)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-12, rtol=1e-10, msg=name)
    assert all(g.abs().max() > 0 for g in grads0.values())


def test_sliding_window_reaches_the_attention_slot():
    """model.window: every layer's attention gets Mask(window), and far tokens stop mattering."""
    seen = []
    inner = build_attention(strategy="none", kernel="torch")

    def capture(q, k, v, coords, mask):
        seen.append(mask)
        return inner(q, k, v, coords, mask)

    windowed = make_model(core=capture, window=4)
    ids, pos, docs = inputs(1, 16)
    out = windowed(ids, pos, docs)
    assert seen and all(m.causal and m.window == 4 for m in seen)
    # Changing a token more than 2 layers x 3 tokens back cannot reach the last position.
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 37
    torch.testing.assert_close(windowed(changed, pos, docs)[0, -1], out[0, -1], atol=0, rtol=0)
    full = make_model()
    assert (full(changed, pos, docs)[0, -1] - full(ids, pos, docs)[0, -1]).abs().max() > 1e-6


def test_attention_slot_swaps_per_layer_and_restores():
    model = make_model(num_layers=2)
    original = model.core_attention
    calls = []
    inner = build_attention(strategy="none", kernel="torch")
    per_layer = [lambda q, k, v, c, m, i=i: (calls.append(i), inner(q, k, v, c, m))[1] for i in range(2)]
    ids, pos, docs = inputs(1, 5)
    with model.attention_slot(per_layer):
        model(ids, pos, docs)
    assert calls == [0, 1] and all(b.attn.core is original for b in model.layers)
    with pytest.raises(ValueError, match="3 attention callables for 2 layers"):
        model.set_core_attention(per_layer + per_layer[:1])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_equals_the_untiled_mlp_forward_and_backward(checkpointing):
    ids, pos, docs = inputs(2, 23, seed=7)
    labels = torch.roll(ids, -1, dims=1)
    results = []
    for tile in (0, 5, 23, 64):  # uneven last tile, one tile, a tile longer than the sequence
        model = make_model(seed=3, activation_checkpointing=checkpointing, num_layers=2, mlp_tile_tokens=tile)
        model.train()
        hidden = model(ids, pos, docs)
        loss = chunked_cross_entropy(hidden, model.output_weight, labels, 8)
        loss.backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        with torch.no_grad():  # eval runs the tiles without recomputation
            torch.testing.assert_close(model.eval()(ids, pos, docs), hidden.detach(), atol=1e-12, rtol=1e-12)
    (ref_hidden, ref_grads), *tiled = results
    for hidden, grads in tiled:
        torch.testing.assert_close(hidden, ref_hidden, atol=1e-12, rtol=1e-12)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-12, rtol=1e-12)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        assert float(norm) == pytest.approx(float(torch.sqrt(sum((g ** 2).sum() for g in ref_grads.values()))),
                                            rel=1e-12)


def test_tiled_mlp_holds_one_tile_of_intermediates():
    """Saved for backward inside the MLP: one tile's input per tile, never (tokens, ffn_dim)."""
    from lctrain.models.llama import SwiGLU

    torch.manual_seed(0)
    x = torch.randn(1, 64, 8, dtype=F64, requires_grad=True)
    sizes = {}
    for tile in (0, 16):
        mlp = SwiGLU(8, 32, tile).double()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            mlp(x).sum().backward()
        sizes[tile] = max(saved)
    assert sizes[0] >= 64 * 32 and sizes[16] <= 16 * 32


@pytest.mark.parametrize("every,offload", [(1, True), (2, False), (2, True)])
def test_selective_checkpointing_and_offload_change_nothing_but_memory(every, offload, monkeypatch):
    import lctrain.models.llama as llama

    ids, pos, docs = inputs(2, 17, seed=5)
    labels = torch.roll(ids, -1, dims=1)
    results, offloaded = [], []
    real = llama._on_device_block
    monkeypatch.setattr(llama, "_on_device_block", lambda *a: offloaded.append(a[2].device) or real(*a))
    for ac in (False, True):
        model = make_model(seed=3, num_layers=4, activation_checkpointing=ac)
        model.checkpoint_every, model.activation_offload = every, offload and ac
        model.train()
        loss = chunked_cross_entropy(model(ids, pos, docs), model.output_weight, labels, 6)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    # Offloaded blocks (0, every, ...) run from their host copy in the forward and again when recomputed.
    assert offloaded == ([torch.device("cpu")] * 2 * len(range(0, 4, every)) if offload else [])


def test_bf16_autocast_trains_and_tracks_fp32():
    """trainer.dtype=bfloat16 (and the GPU default): fp32 weights under bf16 autocast. The projections
    come out in bf16 while RoPE's tables are fp32, so q / k are rotated in fp32 and cast back: the
    attention slot gets q, k, v in one dtype, and loss and gradients stay near fp32's."""
    ids, pos, docs = inputs(2, 24, seed=7)
    labels = torch.roll(ids, -1, dims=1)
    seen = []
    inner = build_attention(strategy="none", kernel="torch")

    def recording(q, k, v, coords, mask):
        seen.append({q.dtype, k.dtype, v.dtype})
        return inner(q, k, v, coords, mask)

    results = []
    for autocast in (False, True):
        model = make_model(core=recording, seed=4, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = model(ids, pos, docs)
            loss = chunked_cross_entropy(hidden, model.output_weight, labels, 16) / labels.numel()
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert seen[-1] == {torch.bfloat16} and seen[0] == {torch.float32}
    (loss32, grad32), (loss16, grad16) = results
    assert abs(loss16 - loss32) < 2e-2 * abs(loss32)
    assert (grad16 - grad32).norm() < 5e-2 * grad32.norm()
    assert abs(grad16.norm() / grad32.norm() - 1) < 2e-2
