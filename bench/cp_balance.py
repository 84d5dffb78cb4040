"""Context-parallel work balance and traffic per rank (CPU only, no timers).

For every strategy (ring, allgather, ulysses, usp, tree) x layout x data
setting x P this benchmark reports, per rank:

- work: unmasked (query, key) token pairs the rank reports in one attention
  call, exactly as the strategy's ``AttentionCounters`` count them (forward;
  the backward recomputes the same pairs). With W[r, j] = pairs between the
  queries rank r holds and the keys rank j holds (``work_matrix``):

  ring, allgather  row sum W[r, :] (the rank's queries meet every key once);
  ulysses          a head share of the whole sequence: total // P, plus one on
                   the first total % P ranks (layout-independent, even);
  usp (degree U)   the ring runs over R = P / U Ulysses groups of U
                   consecutive ranks; at ring step i group g meets the keys of
                   group (g - i) mod R, and each of the group's U ranks
                   reports its integer 1/U share of that step's pairs
                   (pairs // U, plus one on the first pairs % U group ranks:
                   usp.py's _PairShare, applied per step);
  tree             column sum W[:, j]: every rank computes all gathered
                   queries against its *local* keys, so balance is set by
                   where the keys sit, not the queries.

- bytes and messages sent per rank per attention layer, forward and backward,
  from the formulas the strategies' own counters use (see ``bytes_per_rank``),
  for a model shape given on the command line (default Llama-3-8B-like: 32
  query heads, h_kv=8, head_dim=128, bf16 q/K/V, fp32 lse and gradient
  accumulators, batch 1); ulysses / usp replicate K/V heads when their degree
  exceeds h_kv and those replicated bytes are counted.

Balance = max/mean of work over ranks; with compute-bound attention the
slowest rank sets the step time, so the slowdown against a perfectly balanced
split of the same work is also max/mean, and efficiency = mean/max.

For ``ring`` (and the ring inside ``usp``) it also reports the lock-step
figure: the sum over the ring steps of the slowest rank's work at that step,
over the mean work per rank (a rank cannot start step i+1 before its
neighbour's block has arrived, so a step is only as fast as its slowest rank
when transfers are hidden).

Counting uses exact integer math per (query shard, key block): with documents
packed as contiguous runs and the layout's local positions increasing, the
keys a query at position p sees in a block are those with position in
[max(doc_start, p - w + 1), p] (causal), counted with two searchsorted calls.
The script cross-checks that count against the project's mask rule
``lctrain.attention.counters.count_visible_pairs`` on every configuration at a
small sequence length (row sums, column sums and one off-diagonal block per
rank), and (unless --no-validate) runs all five real strategies on gloo ranks
at a small size to check bytes, messages and pairs per phase and per rank
against ``AttentionCounters``.

Run:  .venv/bin/python bench/cp_balance.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lctrain.attention.counters import AttentionCounters, count_visible_pairs  # noqa: E402
from lctrain.attention.layouts import LAYOUT_NAMES, get_layout  # noqa: E402
from lctrain.attention.ulysses import usable_degrees  # noqa: E402

STRATEGIES = ("ring", "allgather", "ulysses", "usp", "tree")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
COORD_BYTES = 8  # pos and doc travel as int64


# ----------------------------------------------------------------------------- data


def one_document(seq_len: int) -> np.ndarray:
    """Document id of every token: one document spanning the sequence."""
    return np.zeros(seq_len, dtype=np.int64)


def packed_skewed_lengths(seq_len: int, seed: int, median: float, sigma: float) -> list[int]:
    """Deterministic log-normal document lengths filling ``seq_len`` exactly (last one cut)."""
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total < seq_len:
        n = max(1, int(round(rng.lognormal(mean=np.log(median), sigma=sigma))))
        n = min(n, seq_len - total)
        lengths.append(n)
        total += n
    return lengths


def docs_from_lengths(lengths: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


# ----------------------------------------------------------------------------- counting


def doc_bounds(doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last position of each token's document (documents are contiguous runs)."""
    seq_len = doc.shape[0]
    change = np.flatnonzero(np.diff(doc)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [seq_len]])
    run = np.repeat(np.arange(starts.shape[0]), ends - starts)
    return starts[run], ends[run]


def analytic_pairs(q_pos: np.ndarray, k_pos: np.ndarray, doc: np.ndarray, causal: bool, window) -> int:
    """Visible pairs between queries at ``q_pos`` and keys at sorted ``k_pos`` (global positions).

    Same rule as ``lctrain_kernels.mask.visible_mask`` for contiguous documents:
    same document, not padding (-1), key not after the query when causal, and
    distance < window.
    """
    start, end = doc_bounds(doc)
    lo, hi = start[q_pos], end[q_pos] - 1  # inclusive key range inside the document
    if causal:
        hi = q_pos
    if window is not None:
        lo = np.maximum(lo, q_pos - window + 1)
        if not causal:
            hi = np.minimum(hi, q_pos + window - 1)
    count = np.searchsorted(k_pos, hi, side="right") - np.searchsorted(k_pos, lo, side="left")
    count = np.where((doc[q_pos] >= 0) & (hi >= lo), count, 0)
    return int(count.sum())


def work_matrix(layout_name: str, cp: int, doc: np.ndarray, causal: bool, window) -> np.ndarray:
    """W[r, j] = pairs rank r's queries compute against the keys rank j holds."""
    layout = get_layout(layout_name, cp)
    seq_len = doc.shape[0]
    shards = [layout.positions(seq_len, r).numpy() for r in range(cp)]
    return np.array([[analytic_pairs(shards[r], shards[j], doc, causal, window) for j in range(cp)]
                     for r in range(cp)], dtype=np.int64)


def cross_check(layouts, cps, docs: dict, causal: bool, window) -> dict:
    """Analytic counts == count_visible_pairs (the project's mask rule) for every rank and block."""
    checked = 0
    for data, doc in docs.items():
        seq_len = doc.shape[0]
        doc_t = torch.from_numpy(doc)
        all_pos = torch.arange(seq_len)
        for name in layouts:
            for cp in cps:
                layout = get_layout(name, cp)
                w = work_matrix(name, cp, doc, causal, window)
                shards = [layout.positions(seq_len, r) for r in range(cp)]
                for r in range(cp):
                    full = count_visible_pairs(shards[r], all_pos, doc_t[shards[r]], doc_t, causal, window)
                    assert full == int(w[r].sum()), (data, name, cp, r, full, int(w[r].sum()))
                    # tree: every query of the sequence against the keys rank r holds
                    col = count_visible_pairs(all_pos, shards[r], doc_t, doc_t[shards[r]], causal, window)
                    assert col == int(w[:, r].sum()), (data, name, cp, r, col, int(w[:, r].sum()))
                    j = (r + 1) % cp  # one off-diagonal block per rank as well
                    blk = count_visible_pairs(shards[r], shards[j], doc_t[shards[r]], doc_t[shards[j]],
                                              causal, window)
                    assert blk == int(w[r, j]), (data, name, cp, r, j, blk, int(w[r, j]))
                    checked += 3
    return {"ok": True, "counts_compared": checked}


def split_share(pairs: int, parts: int, index: int) -> int:
    """Integer share of ``pairs`` that part ``index`` of ``parts`` reports (ulysses / usp counters)."""
    return pairs // parts + int(index < pairs % parts)


def applicable(strategy: str, cp: int, shape: dict, ulysses: int) -> str | None:
    """None when the strategy runs at this P with this model shape, else the reason it is skipped."""
    heads, h_kv = shape["heads"], shape["h_kv"]
    if strategy == "ulysses" and cp not in usable_degrees(heads, h_kv):
        return f"ulysses degree {cp} not usable for h={heads}, h_kv={h_kv}"
    if strategy == "usp":
        if cp % ulysses or cp == ulysses:
            return f"usp needs U={ulysses} dividing P and P > U"
        if ulysses not in usable_degrees(heads, h_kv):
            return f"usp Ulysses degree {ulysses} not usable for h={heads}, h_kv={h_kv}"
    return None


def strategy_work(strategy: str, w: np.ndarray, ulysses: int) -> tuple[list[int], list[int] | None]:
    """Pairs each rank's counters report (forward; backward is the same), and for ring-like
    strategies the slowest rank's pairs at each ring step (else None). ``w`` = ``work_matrix``."""
    cp = w.shape[0]
    if strategy in ("ring", "allgather"):
        work = [int(x) for x in w.sum(axis=1)]
        # ring step i: rank r computes on the block of rank (r - i) mod P
        steps = [max(int(w[r, (r - i) % cp]) for r in range(cp)) for i in range(cp)]
        return work, steps if strategy == "ring" else None
    if strategy == "ulysses":
        total = int(w.sum())
        return [split_share(total, cp, r) for r in range(cp)], None
    if strategy == "tree":
        return [int(x) for x in w.sum(axis=0)], None
    if strategy == "usp":
        u, r_size = ulysses, cp // ulysses
        # pairs between the tokens of Ulysses group g (ranks g*U .. g*U+U-1) and those of group g'
        wg = w.reshape(r_size, u, r_size, u).sum(axis=(1, 3))
        per_step = [[split_share(int(wg[p // u, (p // u - i) % r_size]), u, p % u) for p in range(cp)]
                    for i in range(r_size)]
        work = [sum(step[p] for step in per_step) for p in range(cp)]
        return work, [max(step) for step in per_step]
    raise ValueError(strategy)


# ----------------------------------------------------------------------------- bytes


def _replicas(h_kv: int, degree: int) -> int:
    """K/V head copies a Ulysses exchange of ``degree`` ranks sends (ulysses.py's _kv_replicas)."""
    return 1 if h_kv % degree == 0 else degree // h_kv


def bytes_per_rank(strategy: str, cp: int, seq_len: int, shape: dict, ulysses: int = 2) -> dict:
    """Bytes and messages one rank sends per attention layer, as the strategy's counters count them.

    s = seq_len / P local tokens, b batch, h query heads (``shape["heads"]``, not
    needed by ring / allgather), k = h_kv, d head_dim, e bytes of a q/K/V element,
    a bytes of an accumulation element (lse, dK/dV, dq: fp32, fp64 for fp64);
    coordinates are int64 pos and doc, one row per batch row: C = 16 b s.
    K/V shard = 2 b s k d e; dK/dV accumulator = 2 b s k d a.

    ring      fwd: (P-1) (K/V + C)                                      msgs P-1
              bwd: (P-1) (K/V + C) + P dK/dV                            msgs 2P-1
    allgather fwd: (P-1) (K/V + C)            [2 all-gathers]           msgs 2
              bwd: (P-1) K/V + (P-1) dK/dV    [all-gather + reduce-scatter share]   msgs 2
    ulysses   kr = k x replicas (P / k when P > k), all-to-alls send (P-1)/P of the buffer:
              fwd: (P-1) C + (P-1)/P b s d [(h + 2 kr) e + h e] + (P-1)/P b s h a
                   [coords all-gather; q/k/v; out; lse]                 msgs 4
              bwd: (P-1)/P b s d [h e + (h + 2 kr) a]  [dout; dq/dk/dv] msgs 2
    usp       U = Ulysses degree, R = P / U, kr = k x replicas(U), ring over R groups on
              head shards of U s tokens (K/V block 2 b s kr d e, coords 16 b U s):
              fwd: (U-1) C + (U-1)/U b s d (h + 2 kr) e + (R-1) (2 b s kr d e + 16 b U s)
                   + (U-1)/U b s (h d e + h a)                          msgs R + 3
              bwd: (U-1)/U b s h d e + (R-1) (2 b s kr d e + 16 b U s) + R 2 b s kr d a
                   + (U-1)/U b s d (h + 2 kr) e [ring grads come back in q/K/V dtype]
                                                                        msgs 2R + 1
    tree      query_chunk None (one chunk; bytes do not depend on it):
              fwd: (P-1) (C + b s h d e + 2 b h s a + b s h (d+1) a)
                   [coords, q all-gathers; lse all-reduce max; num/den reduce-scatter]   msgs 4
              bwd: (P-1) (2 b s h d e + 2 b h s a + b s h d a)
                   [q+dout, lse+delta all-gathers; dq reduce-scatter]   msgs 3
    """
    zero = {"forward": 0, "backward": 0, "messages_forward": 0, "messages_backward": 0}
    if cp == 1:
        return zero
    b, k, d = shape["batch"], shape["h_kv"], shape["head_dim"]
    e, a = DTYPE_BYTES[shape["kv_dtype"]], DTYPE_BYTES[shape["acc_dtype"]]
    local = seq_len // cp
    elems = 2 * b * local * k * d
    kv = elems * e
    acc = elems * a
    coords = 2 * b * local * COORD_BYTES
    if strategy == "ring":
        fwd = (cp - 1) * (kv + coords)
        return {"forward": fwd, "backward": fwd + cp * acc,
                "messages_forward": cp - 1, "messages_backward": 2 * cp - 1}
    if strategy == "allgather":
        return {"forward": (cp - 1) * (kv + coords), "backward": (cp - 1) * (kv + acc),
                "messages_forward": 2, "messages_backward": 2}
    h = shape["heads"]
    if strategy == "ulysses":
        kr = k * _replicas(k, cp)
        hp, kp = h // cp, kr // cp  # heads per rank: one all-to-all row = b s (heads / P) d
        fwd = ((cp - 1) * coords + (cp - 1) * b * local * d * (hp + 2 * kp) * e
               + (cp - 1) * b * local * hp * d * e + (cp - 1) * b * hp * local * a)
        bwd = (cp - 1) * b * local * hp * d * e + (cp - 1) * b * local * d * (hp + 2 * kp) * a
        return {"forward": fwd, "backward": bwd, "messages_forward": 4, "messages_backward": 2}
    if strategy == "usp":
        u, r = ulysses, cp // ulysses
        kr = k * _replicas(k, u)
        hu, ku = h // u, kr // u
        ring_kv = 2 * b * (u * local) * ku * d * e + 2 * b * (u * local) * COORD_BYTES
        ring_acc = 2 * b * (u * local) * ku * d * a
        qkv_rows = (u - 1) * b * local * d * (hu + 2 * ku) * e
        fwd = ((u - 1) * coords + qkv_rows + (r - 1) * ring_kv
               + (u - 1) * b * local * hu * d * e + (u - 1) * b * hu * local * a)
        bwd = (u - 1) * b * local * hu * d * e + (r - 1) * ring_kv + r * ring_acc + qkv_rows
        return {"forward": fwd, "backward": bwd, "messages_forward": r + 3, "messages_backward": 2 * r + 1}
    if strategy == "tree":
        fwd = (cp - 1) * (coords + b * local * h * d * e + 2 * b * h * local * a + b * local * h * (d + 1) * a)
        bwd = (cp - 1) * (2 * b * local * h * d * e + 2 * b * h * local * a + b * local * h * d * a)
        return {"forward": fwd, "backward": bwd, "messages_forward": 4, "messages_backward": 3}
    raise ValueError(strategy)


# ----------------------------------------------------------------------------- real-strategy check


def _rank_counters(rank, world_size, cases, shape, ulysses):
    """Run the real strategies once per case on this gloo rank; return its counters."""
    import torch.distributed as dist

    from lctrain.attention.allgather import allgather_attention
    from lctrain.attention.ring import ring_attention
    from lctrain.attention.tree import tree_attention
    from lctrain.attention.ulysses import ulysses_attention
    from lctrain.attention.usp import usp_attention
    from lctrain.distributed.groups import build_parallel_groups

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    usp_groups = None
    if any(strategy == "usp" for strategy, _, _ in cases):
        usp_groups = build_parallel_groups(rank, world_size, 1, world_size, ulysses_size=ulysses).usp_groups
    dtype = TORCH_DTYPES[shape["kv_dtype"]]
    results = []
    for strategy, layout_name, doc_list in cases:
        doc = torch.tensor(doc_list, dtype=torch.long)
        seq_len = doc.shape[0]
        layout = get_layout(layout_name, world_size)
        pos = layout.positions(seq_len, rank)
        gen = torch.Generator().manual_seed(0)
        b, h, h_kv, d = shape["batch"], shape["heads"], shape["h_kv"], shape["head_dim"]
        q = torch.randn(b, seq_len, h, d, generator=gen).to(dtype)
        k = torch.randn(b, seq_len, h_kv, d, generator=gen).to(dtype)
        v = torch.randn(b, seq_len, h_kv, d, generator=gen).to(dtype)
        q, k, v = (layout.shard(x, rank, dim=1).requires_grad_() for x in (q, k, v))
        counters = AttentionCounters()
        kwargs = dict(causal=True, window=None, counters=counters)
        if strategy == "usp":
            out, _ = usp_attention(q, k, v, pos, doc[pos], *usp_groups, **kwargs)
        elif strategy == "tree":
            out, _ = tree_attention(q, k, v, pos, doc[pos], None, query_chunk=None, **kwargs)
        else:
            fn = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}[strategy]
            out, _ = fn(q, k, v, pos, doc[pos], None, **kwargs)
        out.float().sum().backward()
        results.append({key: dict(val) for key, val in counters.per_phase.items()})
    return results


def validate_with_real_strategies(cps, seq_len: int, seed: int, ulysses: int) -> dict:
    """Counters of the real strategies (gloo, small shape) vs this script's formulas and counts.

    Per rank and per phase: bytes_sent == ``bytes_per_rank``, messages_sent == its
    message count, pairs == ``strategy_work`` (for usp the exact per-ring-step
    integer split, so the per-rank comparison is exact, not just group sums).
    """
    from tests.dist_utils import run_ranks

    shape = {"batch": 1, "heads": 4, "h_kv": 2, "head_dim": 8, "kv_dtype": "bf16", "acc_dtype": "fp32"}
    docs = {"one_doc": one_document(seq_len),
            "packed": docs_from_lengths(packed_skewed_lengths(seq_len, seed, median=8, sigma=1.0))}
    report, skipped = [], []
    for cp in cps:
        strategies = []
        for s in STRATEGIES:
            reason = applicable(s, cp, shape, ulysses)
            if reason is None:
                strategies.append(s)
            else:
                skipped.append({"strategy": s, "P": cp, "why": reason})
        cases = [(s, name, docs[data].tolist(), data) for s in strategies for name in LAYOUT_NAMES
                 for data in docs]
        per_rank = run_ranks(_rank_counters, cp, [c[:3] for c in cases], shape, ulysses)
        for i, (strategy, name, _, data) in enumerate(cases):
            work, _ = strategy_work(strategy, work_matrix(name, cp, docs[data], True, None), ulysses)
            want = bytes_per_rank(strategy, cp, seq_len, shape, ulysses)
            for r in range(cp):
                got = per_rank[r][i]
                for phase in ("forward", "backward"):
                    expect = {"bytes_sent": want[phase], "messages_sent": want[f"messages_{phase}"],
                              "pairs": work[r]}
                    assert got[phase] == expect, (strategy, name, data, cp, r, phase, got[phase], expect)
            report.append({"strategy": strategy, "layout": name, "data": data, "P": cp, "ok": True})
    return {"ok": True, "seq_len": seq_len, "shape": shape, "usp_ulysses": ulysses,
            "compared": "per rank and phase: bytes_sent, messages_sent, pairs (exact equality)",
            "cases": report, "not_applicable": skipped}


# ----------------------------------------------------------------------------- main


def device_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lock(row) -> str:
    return "-" if row["lockstep_over_mean"] is None else f"{row['lockstep_over_mean']:.3f}"


def markdown_table(rows, cps) -> str:
    """Every row for P in ``cps`` (stdout and JSON)."""
    lines = ["| strategy | layout | data | P | balance max/mean | efficiency mean/max | lock-step max/mean "
             "| bytes/rank/layer fwd | bytes/rank/layer bwd | messages fwd/bwd |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["P"] not in cps:
            continue
        lines.append(
            f"| {row['strategy']} | {row['layout']} | {row['data']} | {row['P']} | {row['balance']:.3f} "
            f"| {row['efficiency']:.3f} | {_lock(row)} | {fmt_bytes(row['bytes_forward'])} "
            f"| {fmt_bytes(row['bytes_backward'])} | {row['messages_forward']}/{row['messages_backward']} |")
    return "\n".join(lines)


COMPACT_ROWS = (("ring", "contiguous"), ("ring", "zigzag"), ("ring", "striped"), ("ulysses", "striped"),
                ("usp", "contiguous"), ("usp", "striped"), ("tree", "contiguous"), ("tree", "zigzag"),
                ("tree", "striped"))


def compact_tables(rows, cps, ulysses: int) -> str:
    """README tables: balance per (strategy, layout) at the table P's; traffic per strategy."""
    index = {(r["strategy"], r["layout"], r["data"], r["P"]): r for r in rows}
    datas = ("one_doc", "packed")
    head = " | ".join(f"{d} P={p}" for d in datas for p in cps)
    lines = [f"| strategy | layout | {head} |", "|---|---|" + "---|" * (len(datas) * len(cps))]
    for strategy, layout in COMPACT_ROWS:
        cells = []
        for data in datas:
            for cp in cps:
                row = index.get((strategy, layout, data, cp))
                if row is None:
                    cells.append("n/a")
                    continue
                lock = row["lockstep_over_mean"]
                cells.append(f"{row['balance']:.3f}" + ("" if lock is None else f" ({lock:.3f})"))
        label = {"ring": "ring / allgather", "usp": f"usp U={ulysses}"}.get(strategy, strategy)
        lines.append(f"| {label} | {'any' if strategy == 'ulysses' else layout} | {' | '.join(cells)} |")
    lines += ["", "| strategy | " + " | ".join(f"P={p} fwd | P={p} bwd | P={p} msgs" for p in cps) + " |",
              "|---|" + "---|" * (3 * len(cps))]
    for strategy in STRATEGIES:
        cells = []
        for cp in cps:
            row = index.get((strategy, "striped", "one_doc", cp))
            cells += (["n/a"] * 3 if row is None else
                      [fmt_bytes(row["bytes_forward"]), fmt_bytes(row["bytes_backward"]),
                       f"{row['messages_forward']}/{row['messages_backward']}"])
        label = f"usp U={ulysses}" if strategy == "usp" else strategy
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def all_p_table(rows, cps) -> str:
    """Balance for every P: ring (lock-step) / tree, per layout and data."""
    index = {(r["strategy"], r["layout"], r["data"], r["P"]): r for r in rows}
    lines = ["| layout | data | " + " | ".join(f"P={p}" for p in cps) + " |", "|---|---|" + "---|" * len(cps)]
    for data in ("one_doc", "packed"):
        for name in LAYOUT_NAMES:
            cells = []
            for cp in cps:
                ring, tree = index[("ring", name, data, cp)], index[("tree", name, data, cp)]
                cells.append(f"{ring['balance']:.3f} ({ring['lockstep_over_mean']:.3f}) / {tree['balance']:.3f}")
            lines.append(f"| {name} | {data} | {' | '.join(cells)} |")
    return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def plot(rows, cps, path: Path, ulysses: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = sorted({row["data"] for row in rows}, key=lambda d: d != "one_doc")
    fig, axes = plt.subplots(1, len(datas), figsize=(6.5 * len(datas), 4.8), sharey=True)
    axes = np.atleast_1d(axes)

    def series(data, name, strategy, key="balance"):
        pts = [(r["P"], r[key]) for r in rows
               if r["data"] == data and r["layout"] == name and r["strategy"] == strategy]
        return [p for p, _ in pts], [b for _, b in pts]

    for ax, data in zip(axes, datas):
        for name, marker, color in zip(LAYOUT_NAMES, "osD", ("C0", "C1", "C2")):
            ax.plot(*series(data, name, "ring"), marker=marker, color=color, label=f"{name} ring/allgather")
            ax.plot(*series(data, name, "ring", "lockstep_over_mean"), marker=marker, color=color, linestyle=":",
                    alpha=0.6, label=f"{name} (ring lock-step)")
            ax.plot(*series(data, name, "tree"), marker=marker, color=color, linestyle="-.", markerfacecolor="none",
                    markersize=8, label=f"{name} tree (keys side)")
            ax.plot(*series(data, name, "usp"), marker="x", color=color, linestyle="--", alpha=0.7,
                    label=f"{name} usp U={ulysses}")
        ps = np.array(cps, dtype=float)
        if data == "one_doc":
            ax.plot(ps, (2 * ps - 1) / ps, color="black", linestyle="--", linewidth=0.8,
                    label="(2P-1)/P: contiguous, exact")
            ax.plot(ps, 2 * ps / (ps + 1), color="grey", linestyle="--",
                    label="2P/(P+1): Striped Attention ceiling")
        ax.axhline(1.0, color="black", linewidth=0.5, label="ulysses (any layout)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cps, [str(p) for p in cps])
        ax.set_xlabel("context-parallel ranks P")
        ax.set_title(f"causal, {data}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("work balance max/mean")
    for ax in axes:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--window", type=int, default=None, help="sliding window in tokens (default none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc-median", type=float, default=256.0, help="median packed document length")
    parser.add_argument("--doc-sigma", type=float, default=1.5, help="log-normal sigma of document lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32, help="query heads (ulysses, usp, tree traffic)")
    parser.add_argument("--h-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kv-dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="q/K/V dtype")
    parser.add_argument("--usp-ulysses", type=int, default=2,
                        help="Ulysses degree U of usp (P's that U does not divide, or P == U, are skipped)")
    parser.add_argument("--check-seq-len", type=int, default=2048,
                        help="sequence length of the cross-check against count_visible_pairs")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip running the real strategies on gloo ranks")
    parser.add_argument("--validate-cp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--table-cp", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args(argv)
    t0 = time.time()
    causal = True
    ulysses = args.usp_ulysses
    shape = {"batch": args.batch, "heads": args.heads, "h_kv": args.h_kv, "head_dim": args.head_dim,
             "kv_dtype": args.kv_dtype, "acc_dtype": "fp64" if args.kv_dtype == "fp64" else "fp32"}
    if args.heads % args.h_kv:
        parser.error("--heads must be a multiple of --h-kv (GQA)")
    for cp in args.cp:
        if args.seq_len % (2 * cp):
            parser.error(f"--seq-len must be a multiple of 2P = {2 * cp} (zigzag)")

    lengths = packed_skewed_lengths(args.seq_len, args.seed, args.doc_median, args.doc_sigma)
    docs = {"one_doc": one_document(args.seq_len), "packed": docs_from_lengths(lengths)}

    # 1) the analytic count against the project's mask rule, at a small size
    small = args.check_seq_len
    small_docs = {"one_doc": one_document(small),
                  "packed": docs_from_lengths(packed_skewed_lengths(small, args.seed, args.doc_median / 8,
                                                                    args.doc_sigma))}
    check = cross_check(LAYOUT_NAMES, args.cp, small_docs, causal, args.window)
    t_check = time.time() - t0

    # 2) every figure at the full size
    rows, skipped = [], []
    for strategy in STRATEGIES:
        for cp in args.cp:
            reason = applicable(strategy, cp, shape, ulysses)
            if reason is not None:
                skipped.append({"strategy": strategy, "P": cp, "why": reason})
    for data, doc in docs.items():
        for name in LAYOUT_NAMES:
            for cp in args.cp:
                w = work_matrix(name, cp, doc, causal, args.window)
                for strategy in STRATEGIES:
                    if applicable(strategy, cp, shape, ulysses) is not None:
                        continue
                    work, steps = strategy_work(strategy, w, ulysses)
                    work_arr = np.array(work, dtype=np.float64)
                    mean = work_arr.mean()
                    nbytes = bytes_per_rank(strategy, cp, args.seq_len, shape, ulysses)
                    rows.append({
                        "strategy": strategy, "layout": name, "data": data, "P": cp,
                        "ulysses_degree": ulysses if strategy == "usp" else (cp if strategy == "ulysses" else None),
                        "work_per_rank": work,
                        "work_total": int(sum(work)),
                        "balance": float(work_arr.max() / mean),
                        "slowdown_vs_ideal": float(work_arr.max() / mean),
                        "efficiency": float(mean / work_arr.max()),
                        "ring_step_max_pairs": steps,
                        "lockstep_over_mean": None if steps is None else float(sum(steps) / mean),
                        "bytes_forward": nbytes["forward"],
                        "bytes_backward": nbytes["backward"],
                        "bytes_forward_per_rank": [nbytes["forward"]] * cp,
                        "bytes_backward_per_rank": [nbytes["backward"]] * cp,
                        "messages_forward": nbytes["messages_forward"],
                        "messages_backward": nbytes["messages_backward"],
                    })
                    assert rows[-1]["work_total"] == int(w.sum()), rows[-1]  # every strategy: same total
    t_figures = time.time() - t0 - t_check

    # 3) the real strategies' counters at a small size (optional)
    validation = {"skipped": True}
    if not args.no_validate:
        validation = validate_with_real_strategies(args.validate_cp, seq_len=64, seed=args.seed, ulysses=ulysses)
    elapsed = time.time() - t0

    table = markdown_table(rows, args.table_cp)
    compact = compact_tables(rows, args.table_cp, ulysses)
    all_p = all_p_table(rows, args.cp)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "cp_balance",
        "device": device_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
        "parameters": {
            "seq_len": args.seq_len, "cp": args.cp, "causal": causal, "window": args.window,
            "strategies": list(STRATEGIES), "layouts": list(LAYOUT_NAMES), "usp_ulysses": ulysses,
            "tree_query_chunk": None,
            "model_shape": shape, "coord_bytes": COORD_BYTES,
            "data": {
                "one_doc": "one document of seq_len tokens",
                "packed": {"distribution": "log-normal, last document cut to fill seq_len",
                           "seed": args.seed, "median": args.doc_median, "sigma": args.doc_sigma,
                           "num_docs": len(lengths), "max_len": max(lengths),
                           "lengths": lengths},
            },
            "work_definition": {
                "all": "unmasked (query, key) token pairs the rank's AttentionCounters report, forward; the "
                       "backward reports the same pairs",
                "ring": "the rank's queries against every key, summed over its P blocks (row sum of W)",
                "allgather": "the rank's queries against all gathered keys in one call (row sum of W)",
                "ulysses": "head share of the whole sequence's pairs: total // P, +1 on the first total % P ranks",
                "usp": "ring over R = P/U Ulysses groups; at each ring step every rank of a group reports "
                       "pairs // U (+1 on the first pairs % U group ranks) of its group's block pairs",
                "tree": "all gathered queries against the rank's local keys (column sum of W)",
            },
        },
        "skipped": skipped,
        "cross_check_count_visible_pairs": {**check, "seq_len": small},
        "validation_real_strategies": validation,
        "seconds": {"cross_check": round(t_check, 2), "figures": round(t_figures, 2), "total": round(elapsed, 2)},
        "rows": rows,
        "markdown_table": table,
        "markdown_compact": compact,
        "markdown_balance_all_p": all_p,
    }
    (args.out / "cp_balance.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.cp, args.out / "cp_balance.png", ulysses)
    print(table)
    print("\n" + compact + "\n\n" + all_p)
    print(f"\ncross-check vs count_visible_pairs: {check['counts_compared']} counts equal (seq_len {small}); "
          f"real strategies: {'skipped' if validation.get('skipped') else 'counters match'}; {elapsed:.1f}s")
    print(f"wrote {args.out / 'cp_balance.json'} and {args.out / 'cp_balance.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
