"""The Triton attention kernels against the dense reference: out, lse, dq, dk, dv.

Triton wraps its language helpers for the interpreter only when ``TRITON_INTERPRET=1`` is set
before triton is first imported, and anything earlier in a pytest session may have imported it.
So the kernel cases run in one subprocess (this file run as a script, with the variable set),
which returns one JSON record per case; the tests below read those records. The coordinate
planning (plain torch) is tested in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

NEG_INF = float("-inf")
# (atol, rtol) against a float64 reference computed from the same (rounded) inputs.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (2.5e-2, 2.5e-2)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def packed_docs(seq_len, boundaries):
    starts = torch.zeros(seq_len, dtype=torch.long)
    starts[list(boundaries)] = 1
    return torch.cumsum(starts, 0)


def make_case(name):
    """dict(b, sq, sk, h, hk, d, q_pos, k_pos, q_doc, k_doc, causal, window, dtype, blocks)."""
    n, ar = 48, torch.arange(48)
    one, docs = torch.zeros(48, dtype=torch.long), packed_docs(48, [5, 6, 21, 40])
    c = dict(b=1, sq=n, sk=n, h=2, hk=2, d=16, q_pos=ar, k_pos=ar, q_doc=one, k_doc=one, causal=True,
             window=None, dtype="fp32", blocks=(None, None))
    k131, d131 = torch.arange(131), packed_docs(131, [50, 77])
    extra = {
        "causal_mha": {},
        "noncausal_gqa4": dict(h=8, hk=2, causal=False),
        "causal_mqa_docs": dict(h=4, hk=1, d=32, q_doc=docs, k_doc=docs),
        "noncausal_docs": dict(h=4, hk=2, q_doc=docs, k_doc=docs, causal=False),
        "window_causal": dict(h=4, hk=2, q_doc=docs, k_doc=docs, window=7),
        "window_noncausal": dict(h=2, hk=1, causal=False, window=5),
        # a later query chunk over all keys so far (offset coordinates, odd lengths, documents)
        "odd_offset_docs": dict(sq=67, sk=131, h=4, hk=1, q_pos=k131[64:], k_pos=k131, q_doc=d131[64:],
                                k_doc=d131),
        "odd_offset_noncausal": dict(sq=67, sk=131, hk=1, q_pos=k131[64:], k_pos=k131,
                                     q_doc=torch.zeros(67, dtype=torch.long),
                                     k_doc=torch.zeros(131, dtype=torch.long), h=2, causal=False),
        # striped layout: rank 1 of 4 holds queries 1, 5, 9, ...; its keys come from rank 3
        "striped": dict(sq=50, sk=50, h=4, hk=2, q_pos=torch.arange(1, 200, 4), k_pos=torch.arange(3, 200, 4),
                        q_doc=packed_docs(50, [13, 30]), k_doc=packed_docs(50, [13, 31])),
        "striped_window": dict(sq=50, sk=50, q_pos=torch.arange(2, 200, 4), k_pos=torch.arange(0, 200, 4),
                               q_doc=torch.zeros(50, dtype=torch.long), k_doc=torch.zeros(50, dtype=torch.long),
                               window=30),
        "padding_batched": dict(b=2, q_pos=torch.stack([ar, ar + 100]), k_pos=torch.stack([ar, ar + 100]),
                                q_doc=torch.stack([one, torch.where(ar < 30, docs, -1)]),
                                k_doc=torch.stack([one, torch.where(ar < 30, docs, -1)])),
        "left_padding": dict(q_doc=torch.where(ar < 19, -1, docs), k_doc=torch.where(ar < 19, -1, docs)),
        "fully_masked_rows": dict(h=2, hk=1, k_pos=ar + 24),
        # padding inside a document: fully visible spans must stop at it
        "mid_padding": dict(h=4, hk=2, q_doc=torch.where((ar >= 26) & (ar < 29), -1, one),
                            k_doc=torch.where((ar >= 26) & (ar < 29), -1, one)),
        # long documents: several fully visible tiles between masked ones, in every kernel
        "long_docs": dict(sq=160, sk=160, h=4, hk=1, q_pos=torch.arange(160), k_pos=torch.arange(160),
                          q_doc=packed_docs(160, [100]), k_doc=packed_docs(160, [100])),
        "long_docs_window": dict(sq=160, sk=160, h=2, hk=1, q_pos=torch.arange(160), k_pos=torch.arange(160),
                                 q_doc=packed_docs(160, [100]), k_doc=packed_docs(160, [100]), window=70,
                                 causal=False),
        "unsorted_coords": dict(q_pos=ar.flip(0), k_pos=ar[torch.randperm(48, generator=torch.Generator().manual_seed(1))],
                                q_doc=docs.flip(0) % 3, k_doc=docs % 3),
        "blocks_32_16": dict(sq=67, sk=131, q_pos=k131[64:], k_pos=k131, q_doc=d131[64:], k_doc=d131, blocks=(32, 16)),
        "fp16_gqa_docs": dict(h=4, hk=1, d=32, q_doc=docs, k_doc=docs, dtype="fp16"),
        "bf16_noncausal": dict(h=2, hk=1, d=32, causal=False, dtype="bf16"),
    }
    for d in (32, 64, 96, 128, 256):  # every head dim once, on a short sequence
        extra[f"head_dim_{d}"] = dict(sq=20, sk=20, h=2, hk=1, d=d, q_pos=ar[:20], k_pos=ar[:20],
                                      q_doc=docs[:20], k_doc=docs[:20])
    c.update(extra[name])
    return c


CASES = ["causal_mha", "noncausal_gqa4", "causal_mqa_docs", "noncausal_docs", "window_causal",
         "window_noncausal", "odd_offset_docs", "odd_offset_noncausal", "striped", "striped_window",
         "padding_batched", "left_padding", "fully_masked_rows", "mid_padding", "long_docs", "long_docs_window",
         "unsorted_coords", "blocks_32_16",
         "fp16_gqa_docs", "bf16_noncausal", "head_dim_32", "head_dim_64", "head_dim_96", "head_dim_128",
         "head_dim_256"]
AUTOGRAD_CASES = {"causal_mqa_docs", "padding_batched", "bf16_noncausal"}


def _errors(got, want, dtype):
    """Largest |got - want| / (atol + rtol |want|): <= 1 passes. Also flags NaN."""
    atol, rtol = TOLERANCES[dtype]
    got, want = got.detach().double(), want.detach().double()
    if torch.isnan(got).any():
        return float("inf")
    same_inf = (got == want) & torch.isinf(want)
    err = torch.where(same_inf, 0.0, (got - want).abs() / (atol + rtol * want.abs()))
    return float(err.nan_to_num(float("inf")).max()) if err.numel() else 0.0


def kernel_args(c):
    """(q_coords, k_coords, mask) of a case."""
    from lctrain_kernels.mask import Coords, Mask

    return Coords(c["q_pos"], c["q_doc"]), Coords(c["k_pos"], c["k_doc"]), Mask(c["causal"], c["window"])


def run_case(name):
    """Worker side: forward, backward and autograd of one case against the float64 reference."""
    from lctrain_kernels.reference import dense_attention
    from lctrain_kernels.triton.attention import triton_attention, triton_backward, triton_forward

    c = make_case(name)
    dtype = DTYPES[c["dtype"]]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(c["b"], c["sq"], c["h"], c["d"], generator=gen).to(dtype)
    k, v = (torch.randn(c["b"], c["sk"], c["hk"], c["d"], generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn(c["b"], c["sq"], c["h"], c["d"], generator=gen).to(dtype)
    coords = kernel_args(c)
    block_q, block_k = c["blocks"]

    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = dense_attention(q64, k64, v64, *coords)
    ref = (ref_out, ref_lse, *torch.autograd.grad(ref_out, (q64, k64, v64), dout.double()))

    out, lse = triton_forward(q, k, v, *coords, block_q=block_q, block_k=block_k)
    grads = triton_backward(dout, q, k, v, out, lse, *coords, block_q=block_q, block_k=block_k)
    names = ["out", "lse", "dq", "dk", "dv"]
    record = {n: _errors(g, r, dtype) for n, g, r in zip(names, (out, lse, *grads), ref)}
    record["dtypes"] = [str(x.dtype) for x in (out, lse, *grads)]
    if name in AUTOGRAD_CASES:  # the autograd Function: same numbers, gradients cast back to q's dtype
        qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
        out_a, _ = triton_attention(qa, ka, va, *coords, block_q=block_q, block_k=block_k)
        out_a.backward(dout)
        record.update({f"autograd_{n}": _errors(g, r, dtype)
                       for n, g, r in zip(names[2:], (qa.grad, ka.grad, va.grad), ref[2:])})
        record["dtypes"] += [str(x.dtype) for x in (qa.grad, ka.grad, va.grad)]
    dead = torch.isinf(ref_lse)  # rows that see no key: out exactly 0, lse -inf, dq 0
    record["dead_rows"] = int(dead.sum())
    record["dead_ok"] = bool((lse[dead] == NEG_INF).all() and (out.transpose(1, 2)[dead] == 0).all()
                             and (grads[0].transpose(1, 2)[dead] == 0).all())
    return record


def run_external_lse():
    """Keys split in two blocks: merged lse, backward per block with it, gradients summed."""
    from lctrain.attention.merge import merge_partials
    from lctrain_kernels.mask import Coords
    from lctrain_kernels.reference import dense_attention
    from lctrain_kernels.triton.attention import triton_backward, triton_forward

    c = make_case("odd_offset_docs")
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, c["sq"], 4, 16, generator=gen)
    k, v = (torch.randn(1, c["sk"], 1, 16, generator=gen) for _ in range(2))
    dout = torch.randn_like(q)
    split = 70
    blocks = [(slice(0, split), c["k_pos"][:split], c["k_doc"][:split]),
              (slice(split, None), c["k_pos"][split:], c["k_doc"][split:])]
    q_coords = Coords(c["q_pos"], c["q_doc"])
    partials = [triton_forward(q, k[:, s], v[:, s], q_coords, Coords(kp, kd)) for s, kp, kd in blocks]
    out, lse = merge_partials(*partials[0], *partials[1])
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for s, kp, kd in blocks:
        dq_b, dk_b, dv_b = triton_backward(dout, q, k[:, s], v[:, s], out, lse, q_coords, Coords(kp, kd))
        dq, dks, dvs = dq + dq_b, dks + [dk_b], dvs + [dv_b]
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = dense_attention(q64, k64, v64, q_coords, Coords(c["k_pos"], c["k_doc"]))
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    got = (out, lse, dq, torch.cat(dks, 1), torch.cat(dvs, 1))
    return {n: _errors(g, r, torch.float32)
            for n, g, r in zip(["out", "lse", "dq", "dk", "dv"], got, (ref_out, ref_lse, *ref_grads))}


def run_rejections():
    from lctrain_kernels.mask import Coords
    from lctrain_kernels.triton.attention import triton_forward

    x, coords = torch.zeros(1, 4, 1, 16, dtype=torch.float64), Coords.of_sequence(4)
    try:
        triton_forward(x, x, x, coords, coords)
    except ValueError as err:
        return {"fp64": str(err)}
    return {"fp64": None}


def run_kernel_plans():
    """Worker side: the Triton plan kernel (GPU calls) against the torch plan, per planning case."""
    from lctrain_kernels.triton.plan import plan

    equal = {}
    for name in PLAN_CASES:
        c = make_case(name)
        args = (*kernel_args(c), c["b"], torch.device("cpu"))
        by_torch, by_kernel = plan(*args), plan(*args, use_kernel=True)
        equal[name] = all(torch.equal(a, b) for a, b in zip(by_torch, by_kernel))
    return equal


def worker_main():
    torch.set_num_threads(1)
    results, start = {}, time.time()
    for name in CASES:
        case_start = time.time()
        try:
            results[name] = run_case(name)
            results[name]["seconds"] = time.time() - case_start
        except Exception as err:  # reported per case, so one failure does not hide the rest
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    results["external_lse"] = run_external_lse()
    results["rejections"] = run_rejections()
    results["kernel_plans"] = run_kernel_plans()
    results["seconds"] = time.time() - start
    print("RESULTS_JSON " + json.dumps(results))


@pytest.fixture(scope="module")
def results():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS_JSON ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULTS_JSON "):])


@pytest.mark.parametrize("name", CASES)
def test_case_matches_reference(results, name):
    record = results[name]
    assert "error" not in record, record.get("error")
    errors = {key: value for key, value in record.items()
              if key not in ("dtypes", "dead_rows", "dead_ok", "seconds")}
    assert max(errors.values()) <= 1.0, f"error / tolerance per tensor: {errors}"
    assert record["dead_ok"], "rows that see no key need out 0, lse -inf and dq 0"
    # out in q's dtype; lse, dq, dk, dv in float32 (like blockwise_backward); autograd casts back.
    dtype = str(DTYPES[make_case(name)["dtype"]])
    expected = [dtype] + ["torch.float32"] * 4 + ([dtype] * 3 if name in AUTOGRAD_CASES else [])
    assert record["dtypes"] == expected


def test_cases_with_dead_rows_exist(results):
    for name in ("padding_batched", "left_padding", "fully_masked_rows"):
        assert results[name]["dead_rows"] > 0


def test_backward_with_external_lse(results):
    errors = results["external_lse"]
    assert max(errors.values()) <= 1.0, errors


def test_fp64_rejected_with_fix(results):
    assert results["rejections"]["fp64"] and "kernel='torch'" in results["rejections"]["fp64"]


# ------------------------------------------------------------------ planning (in-process, torch only)


PLAN_CASES = ["causal_mha", "causal_mqa_docs", "noncausal_docs", "window_causal", "window_noncausal",
              "odd_offset_docs", "striped", "padding_batched", "left_padding", "unsorted_coords",
              "striped_window", "fully_masked_rows", "mid_padding", "long_docs", "long_docs_window"]


def _spans_by_tile(name):
    """Per (side, row, level, tile): the plan's may/full spans and the visible pairs' truth."""
    from lctrain_kernels.mask import Coords, visible_mask
    from lctrain_kernels.triton.consts import LEVEL_BLOCKS
    from lctrain_kernels.triton.plan import plan

    c = make_case(name)
    q_coords, k_coords, mask = kernel_args(c)
    qp, qd, kp, kd, q_info, k_info = plan(q_coords, k_coords, mask, c["b"], torch.device("cpu"))
    visible = visible_mask(Coords(qp, qd), Coords(kp, kd), mask)  # (rows, sq, sk)
    for block in LEVEL_BLOCKS:
        for info, vis in ((q_info, visible), (k_info, visible.transpose(1, 2))):
            for row in range(vis.shape[0]):
                for tile in range(-(-vis.shape[1] // block)):
                    tile_vis = vis[row, tile * block:(tile + 1) * block]
                    yield (block, tile), merge_runs(info[row, tile * block // 16:(tile + 1) * block // 16]), tile_vis


def merge_runs(runs):
    """A tile's spans from its 16-token runs, as the kernels merge them: union of "may",
    intersection of "full"."""
    return [int(runs[:, 0].min()), int(runs[:, 1].max()), int(runs[:, 2].max()), int(runs[:, 3].min())]


@pytest.mark.parametrize("name", PLAN_CASES)
def test_triton_plan_kernel_equals_torch_plan(results, name):
    """GPU calls plan with one Triton kernel per side (interpreted here): bit for bit the torch plan."""
    assert results["kernel_plans"][name]


@pytest.mark.parametrize("name", PLAN_CASES)
def test_may_spans_cover_visible_pairs(name):
    """Every visible pair lies inside its tiles' "may" spans, at every pyramid level; with
    sorted packed documents and contiguous positions the spans are exact."""
    exact = name in ("causal_mha", "causal_mqa_docs", "odd_offset_docs")
    for where, (lo, hi, _, _), tile_vis in _spans_by_tile(name):
        seen = tile_vis.any(0).nonzero().flatten().tolist()
        if seen:
            assert lo <= seen[0] and seen[-1] < hi, (name, where, lo, hi)
        if exact:
            assert (lo, hi) == ((seen[0], seen[-1] + 1) if seen else (tile_vis.shape[1], 0))


@pytest.mark.parametrize("name", PLAN_CASES)
def test_full_spans_are_fully_visible(name):
    """The kernels run "full" spans without any mask, so every pair there must be visible (for
    every real token of the tile); and with sorted coordinates the spans are the largest such."""
    nonempty = 0
    for where, (_, _, full_lo, full_hi), tile_vis in _spans_by_tile(name):
        if full_hi > full_lo:
            nonempty += 1
            assert tile_vis[:, full_lo:full_hi].all(), (name, where, full_lo, full_hi)
        if name in ("causal_mha", "causal_mqa_docs", "window_causal", "noncausal_docs", "striped", "mid_padding",
                    "long_docs", "long_docs_window"):
            all_rows = tile_vis.all(0).nonzero().flatten().tolist()
            # the largest run of keys visible from every row, when it is contiguous
            if all_rows and all_rows == list(range(all_rows[0], all_rows[-1] + 1)):
                assert (full_lo, full_hi) == (all_rows[0], all_rows[-1] + 1), (name, where)
    # tiles of 16+ tokens there lie inside one document with keys all of them see
    if name in ("causal_mha", "odd_offset_docs", "striped", "padding_batched", "striped_window", "mid_padding",
                "long_docs", "long_docs_window"):
        assert nonempty, "expected some fully visible spans"


if __name__ == "__main__":
    worker_main()
