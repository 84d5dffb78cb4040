"""Distributed greedy decoding (lctrain.decode) on real gloo process groups.

A tiny random-init Llama in float64 (dim 32, 2 layers, 4 heads, 2 K/V heads,
init_std 0.3 so greedy output varies with the context) continues a 4100-token
random prompt by 64 tokens.

Reference: ``single_device_greedy_choices`` runs ONE single-device forward of
the model over prompt + the 64 decoded tokens and takes the argmax after each
prefix. With causal attention row i of that forward is exactly the forward
over the prefix ids[:i + 1], so "choice after each prefix == the next decoded
token" for all 64 tokens is token-for-token equality with single-device greedy
decoding (``single_device_generate``, the step-by-step full recompute, which is
checked against ``generate`` on a short prompt; at 4100 tokens it would take
~100 s on 2 cores). P = 1 decodes in the test process; P = 2 and 4 decode in one
spawn per world size with several (prefill strategy, layout, decode) settings
and must give the same tokens. Counters, cache placement and the exact combine
(against dense attention at 1e-12) are checked in the same spawns.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lctrain.attention import Coords, Mask, build_attention
from lctrain.decode import DecodeSession, generate, single_device_generate, single_device_greedy_choices
from lctrain.decode.combine import (DecodeCounters, butterfly_combine, decode_comm, local_partial, ring_combine,
                                    tree_combine)
from lctrain.distributed.spawn import run_ranks
from lctrain.models.llama import Llama, LlamaShape
from lctrain_kernels.reference import dense_attention

PROMPT_LEN, NEW_TOKENS, NUM_LAYERS = 4100, 64, 2
# (prefill strategy, layout, decode, ring finish); 4100 is not a multiple of 8, so zigzag at
# P = 4 pads the prompt and its rank 0 starts with 4 fewer cached tokens.
CONFIGS = {
    2: [("ring", "striped", "tree", "broadcast"), ("tree", "zigzag", "ring", "broadcast"),
        ("ulysses", "striped", "butterfly", "broadcast")],
    4: [("tree", "zigzag", "tree", "broadcast"), ("allgather", "contiguous", "ring", "broadcast"),
        ("ring", "striped", "ring", "ring"), ("tree", "striped", "butterfly", "broadcast")],
}


def tiny_model() -> Llama:
    torch.manual_seed(0)
    shape = LlamaShape(vocab_size=259, dim=32, num_layers=NUM_LAYERS, num_heads=4, num_kv_heads=2,
                       ffn_dim=64, init_std=0.3)
    return Llama(shape, build_attention("none")).double()


def prompt(length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(1))


def emptiest_owners(lengths, num_tokens: int) -> list[int]:
    """The documented append policy: the rank with the fewest cached tokens, lowest on ties."""
    lengths, owners = list(lengths), []
    for _ in range(num_tokens):
        owner = min(range(len(lengths)), key=lambda r: (lengths[r], r))
        lengths[owner] += 1
        owners.append(owner)
    return owners


def _combine_cases(rank: int, world: int, group) -> list[tuple[str, float, float]]:
    """Tree and ring (both finishes) combine of random shards vs the reference on the full keys:
    two documents, GQA, a key set dealt unevenly, one rank with no key at all."""
    gen = torch.Generator().manual_seed(7)
    n, h, h_kv, d = 37, 4, 2, 8
    k, v = (torch.randn(1, n, h_kv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    q = torch.randn(1, 1, h, d, generator=gen, dtype=torch.float64)
    k_doc = (torch.arange(n) >= 30).long()  # keys 30.. are another document: masked
    owner = torch.randint(0, max(world - 1, 1), (n,), generator=gen)  # the last rank gets none when P > 1
    q_pos, q_doc, k_pos = torch.tensor([[n]]), torch.tensor([[0]]), torch.arange(n)
    q_coords = Coords(q_pos, q_doc)
    ref_out, ref_lse = dense_attention(q, k, v, q_coords, Coords(k_pos, k_doc))
    mine_coords = Coords(k_pos[owner == rank], k_doc[owner == rank])
    mine = owner == rank
    results = []
    combines = (("tree", tree_combine), ("ring-broadcast", ring_combine), ("ring-ring", ring_combine),
                ("butterfly", butterfly_combine))
    for name, combine in combines:
        comm = decode_comm(group, DecodeCounters())
        out, lse = local_partial(q, k[:, mine], v[:, mine], q_coords, mine_coords, Mask())
        args = (out, lse, comm) + ((name.split("-")[1],) if name.startswith("ring") else ())
        out, lse = combine(*args)
        results.append((name, float((out - ref_out).abs().max()), float((lse - ref_lse).abs().max())))
        # A query whose document has no key on any rank: out 0, lse -inf, no NaN.
        out, lse = local_partial(q, k[:, mine], v[:, mine], Coords(q_pos, q_doc + 5), mine_coords, Mask())
        out, lse = combine(*((out, lse, comm) + args[3:]))
        empty_ok = bool((out == 0).all() and (lse == float("-inf")).all())
        results.append((f"{name}-no-key", 0.0 if empty_ok else float("inf"), 0.0))
    return results


def _worker(rank: int, world: int, configs, prompt_len: int, new_tokens: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    model, ids = tiny_model(), prompt(prompt_len)
    runs = []
    for strategy, layout, decode, finish in configs:
        sessions: list[DecodeSession] = []
        new = generate(model, ids, new_tokens, cp_group=group, layout=layout, prefill_strategy=strategy,
                       decode=decode, ring_finish=finish, session_out=sessions)
        s = sessions[0]
        runs.append({"tokens": new.tolist(), "per_token": s.counters.per_token(), "owners": s.cache.owners,
                     "prompt_lengths": s.cache.prompt_lengths, "lengths": s.cache.lengths,
                     "appended": s.counters.appended, "local_size": s.cache.size})
    return {"runs": runs, "combine": _combine_cases(rank, world, group)}


@pytest.fixture(scope="module")
def single_device():
    """P = 1 decoding (no cp group) and its check against single-device greedy choices."""
    model, ids = tiny_model(), prompt()
    sessions: list[DecodeSession] = []
    new = generate(model, ids, NEW_TOKENS, cp_group=None, session_out=sessions)
    choices = single_device_greedy_choices(model, torch.cat([ids, new[:-1]]), NEW_TOKENS)
    return new, choices, sessions[0]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def spawned(request):
    world = request.param
    return world, run_ranks(_worker, world, CONFIGS[world], PROMPT_LEN, NEW_TOKENS)


def test_single_device_generate_matches_generate_on_a_short_prompt():
    model, ids = tiny_model(), prompt(200)
    ref = single_device_generate(model, ids, 12)
    assert torch.equal(generate(model, ids, 12), ref)
    assert len(set(ref.tolist())) > 4  # random init with init_std 0.3 does not repeat one token
    eos = int(ref[3])
    assert generate(model, ids, 12, eos_id=eos).tolist() == ref[: ref.tolist().index(eos) + 1].tolist()


def test_packed_prompt_continues_its_last_document():
    model, ids = tiny_model(), prompt(200)
    doc = torch.cat([torch.zeros(80), torch.ones(120)]).long()
    pos = torch.cat([torch.arange(80), torch.arange(120)])
    ref = single_device_generate(model, ids, 8, position_ids=pos, doc_ids=doc)
    sessions: list[DecodeSession] = []
    assert torch.equal(generate(model, ids, 8, position_ids=pos, doc_ids=doc, session_out=sessions), ref)
    assert sessions[0].cache.size == 120 + 7  # the earlier document is never cached
    # the same continuation as the last document alone: nothing crosses a document boundary
    assert torch.equal(single_device_generate(model, ids[80:], 8), ref)


def test_p1_equals_single_device_greedy(single_device):
    new, choices, session = single_device
    assert len(new) == NEW_TOKENS and len(set(new.tolist())) > 10
    assert new.tolist() == choices.tolist()
    assert session.counters.collectives == session.counters.hops == session.counters.bytes_sent == 0
    assert session.cache.size == PROMPT_LEN + NEW_TOKENS - 1  # the last token is never fed back


def test_distributed_tree_and_ring_decode_equal_single_device_greedy(single_device, spawned):
    world, results = spawned
    expected = single_device[0].tolist()
    for rank, res in enumerate(results):
        for config, run in zip(CONFIGS[world], res["runs"]):
            assert run["tokens"] == expected, (world, rank, config)


def test_collectives_per_token_tree_constant_ring_linear_in_p(spawned):
    world, results = spawned
    for rank, res in enumerate(results):
        for (_, _, decode, finish), run in zip(CONFIGS[world], res["runs"]):
            per = run["per_token"]
            assert per["tokens"] == NEW_TOKENS - 1
            if decode == "tree":  # 2 all-reduces per layer + the token broadcast, whatever P is
                assert per["per_kind"] == {"all_reduce": 2 * NUM_LAYERS, "broadcast": 1}
                assert per["hops"] == 0 and per["latency_steps"] == 2 * NUM_LAYERS + 1
                # MAX of lse (h fp64) + SUM of (h, d + 1) fp64, 2 (P-1)/P of each, + 8 bytes from rank 0
                expected = NUM_LAYERS * 2 * (world - 1) * (4 * 8 + 4 * 9 * 8) // world + (8 if rank == 0 else 0)
                assert per["bytes_sent"] == expected
            elif decode == "butterfly":  # log2 P swap-and-merge rounds per layer + the token broadcast
                assert per["hops"] == per["p2p_messages"] == NUM_LAYERS * (world.bit_length() - 1)
                assert per["collectives"] == 1
            elif finish == "broadcast":  # P-1 chain hops + 1 broadcast per layer, + the token broadcast
                assert per["hops"] == NUM_LAYERS * (world - 1)
                assert per["per_kind"]["broadcast"] == NUM_LAYERS + 1
                assert per["p2p_messages"] == (NUM_LAYERS if rank < world - 1 else 0)
            else:  # a second ring pass instead of the broadcast: 2 (P-1) hops per layer
                assert per["hops"] == 2 * NUM_LAYERS * (world - 1)
                assert per["collectives"] == 1  # ranks P-2 and P-1 send once per layer, the others twice
                assert per["p2p_messages"] == NUM_LAYERS * (2 if rank < world - 2 else 1)


def test_appends_go_to_the_emptiest_rank(spawned):
    world, results = spawned
    for config_index in range(len(CONFIGS[world])):
        runs = [res["runs"][config_index] for res in results]
        owners = runs[0]["owners"]
        assert all(run["owners"] == owners for run in runs)  # every rank agrees without communicating
        assert owners == emptiest_owners(runs[0]["prompt_lengths"], NEW_TOKENS - 1)
        assert [run["appended"] for run in runs] == [owners.count(r) for r in range(world)]
        assert [run["local_size"] for run in runs] == runs[0]["lengths"]
        assert max(runs[0]["lengths"]) - min(runs[0]["lengths"]) <= 1
        assert sum(runs[0]["prompt_lengths"]) == PROMPT_LEN
    if world == 4:  # zigzag over 4 ranks pads 4100 to 4104 on rank 0: it takes the first 4 appends
        zigzag = results[0]["runs"][0]
        assert zigzag["prompt_lengths"] == (1022, 1026, 1026, 1026)
        assert zigzag["owners"][:8] == [0, 0, 0, 0, 0, 1, 2, 3]


def test_tree_and_ring_combine_are_exact(spawned):
    _, results = spawned
    for res in results:
        for name, out_err, lse_err in res["combine"]:
            assert out_err < 1e-12 and lse_err < 1e-12, name
