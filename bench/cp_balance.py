"""Context-parallel work balance and traffic per rank (CPU only, no timers).

For every strategy x layout x data setting x P this benchmark reports, per rank:

- work: unmasked (query, key) pairs the rank computes in one attention call
  (forward; the backward recomputes the same pairs). For ``ring`` and
  ``allgather`` every rank's queries meet every key of the sequence exactly
  once (ring: one K/V block per step over P steps; allgather: all keys in one
  call), so work per rank = the rank's queries against the full sequence.
- bytes sent per rank per attention layer, forward and backward, from the
  formulas the strategies' own counters use (see ``bytes_per_rank``), for a
  model shape given on the command line (default Llama-3-8B-like: h_kv=8,
  head_dim=128, bf16 K/V, fp32 dK/dV accumulators, batch 1).

Balance = max/mean of work over ranks; with compute-bound attention the
slowest rank sets the step time, so the slowdown against a perfectly balanced
split of the same work is also max/mean, and efficiency = mean/max.

For ``ring`` it also reports the lock-step figure: the sum over the P ring
steps of the slowest rank's work at that step, over the mean work per rank
(a rank cannot start step i+1 before its neighbour's block has arrived, so a
step is only as fast as its slowest rank when transfers are hidden).

Counting uses exact integer math per (query shard, key block): with documents
packed as contiguous runs and the layout's local positions increasing, the
keys a query at position p sees in a block are those with position in
[max(doc_start, p - w + 1), p] (causal), counted with two searchsorted calls.
The script cross-checks that count against the project's mask rule
``lctrain.attention.counters.count_visible_pairs`` on every configuration at a
small sequence length, and (unless --no-validate) runs the real ring and
allgather strategies on gloo ranks at a small size to check the byte formulas
and pair counts against ``AttentionCounters``.

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

STRATEGIES = ("ring", "allgather")
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
                    j = (r + 1) % cp  # one off-diagonal block per rank as well
                    blk = count_visible_pairs(shards[r], shards[j], doc_t[shards[r]], doc_t[shards[j]],
                                              causal, window)
                    assert blk == int(w[r, j]), (data, name, cp, r, j, blk, int(w[r, j]))
                    checked += 2
    return {"ok": True, "counts_compared": checked}


# ----------------------------------------------------------------------------- bytes


def bytes_per_rank(strategy: str, cp: int, seq_len: int, shape: dict) -> dict:
    """Bytes one rank sends per attention layer, as the strategy's counters count them.

    K/V shard = 2 x batch x (seq_len / P) x h_kv x head_dim x kv_bytes (K and V packed);
    coordinates = 2 x batch x (seq_len / P) x 8 (int64 pos and doc);
    dK/dV accumulator = 2 x batch x (seq_len / P) x h_kv x head_dim x acc_bytes.

    ring      forward:  (P-1) x (K/V block + coordinates)
              backward: (P-1) x (K/V block + coordinates) + P x dK/dV accumulator
    allgather forward:  (P-1) x (K/V shard + coordinates)    [all-gather of K/V and of coords]
              backward: (P-1) x K/V shard + (P-1) x dK/dV slice [all-gather + reduce-scatter share]
    """
    if cp == 1:
        return {"forward": 0, "backward": 0}
    local = seq_len // cp
    elems = 2 * shape["batch"] * local * shape["h_kv"] * shape["head_dim"]
    kv = elems * DTYPE_BYTES[shape["kv_dtype"]]
    acc = elems * DTYPE_BYTES[shape["acc_dtype"]]
    coords = 2 * shape["batch"] * local * COORD_BYTES
    if strategy == "ring":
        fwd = (cp - 1) * (kv + coords)
        return {"forward": fwd, "backward": fwd + cp * acc}
    if strategy == "allgather":
        return {"forward": (cp - 1) * (kv + coords), "backward": (cp - 1) * (kv + acc)}
    raise ValueError(strategy)


# ----------------------------------------------------------------------------- real-strategy check


def _rank_counters(rank, world_size, cases, shape):
    """Run the real strategies once per case on this gloo rank; return its counters."""
    import torch.distributed as dist

    from lctrain.attention.allgather import allgather_attention
    from lctrain.attention.ring import ring_attention

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    dtype = TORCH_DTYPES[shape["kv_dtype"]]
    results = []
    for strategy, layout_name, doc_list in cases:
        doc = torch.tensor(doc_list, dtype=torch.long)
        seq_len = doc.shape[0]
        layout = get_layout(layout_name, world_size)
        pos = layout.positions(seq_len, rank)
        gen = torch.Generator().manual_seed(0)
        b, h, h_kv, d = shape["batch"], shape["h_kv"] * 2, shape["h_kv"], shape["head_dim"]
        q = torch.randn(b, seq_len, h, d, generator=gen).to(dtype)
        k = torch.randn(b, seq_len, h_kv, d, generator=gen).to(dtype)
        v = torch.randn(b, seq_len, h_kv, d, generator=gen).to(dtype)
        q, k, v = (layout.shard(x, rank, dim=1).requires_grad_() for x in (q, k, v))
        counters = AttentionCounters()
        fn = ring_attention if strategy == "ring" else allgather_attention
        out, _ = fn(q, k, v, pos, doc[pos], None, causal=True, window=None, counters=counters)
        out.float().sum().backward()
        results.append({key: dict(val) for key, val in counters.per_phase.items()})
    return results


def validate_with_real_strategies(cps, seq_len: int, seed: int) -> dict:
    """Counters of the real strategies (gloo, small shape) vs this script's formulas and counts."""
    from tests.dist_utils import run_ranks

    shape = {"batch": 1, "h_kv": 2, "head_dim": 8, "kv_dtype": "bf16", "acc_dtype": "fp32"}
    docs = {"one_doc": one_document(seq_len),
            "packed": docs_from_lengths(packed_skewed_lengths(seq_len, seed, median=8, sigma=1.0))}
    report = []
    for cp in cps:
        cases = [(s, name, docs[data].tolist(), data) for s in STRATEGIES for name in LAYOUT_NAMES
                 for data in docs]
        per_rank = run_ranks(_rank_counters, cp, [c[:3] for c in cases], shape)
        for i, (strategy, name, _, data) in enumerate(cases):
            w = work_matrix(name, cp, docs[data], True, None).sum(axis=1)
            want = bytes_per_rank(strategy, cp, seq_len, shape)
            for r in range(cp):
                got = per_rank[r][i]
                for phase in ("forward", "backward"):
                    assert got[phase]["bytes_sent"] == want[phase], (strategy, name, data, cp, r, phase,
                                                                      got[phase], want[phase])
                    assert got[phase]["pairs"] == int(w[r]), (strategy, name, data, cp, r, phase,
                                                              got[phase], int(w[r]))
            report.append({"strategy": strategy, "layout": name, "data": data, "P": cp, "ok": True})
    return {"ok": True, "seq_len": seq_len, "shape": shape, "cases": report}


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


def markdown_table(rows, cps) -> str:
    lines = ["| strategy | layout | data | P | balance max/mean | efficiency mean/max | ring lock-step max/mean "
             "| bytes/rank/layer fwd | bytes/rank/layer bwd |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["P"] not in cps:
            continue
        lock = f"{row['lockstep_over_mean']:.3f}" if row["strategy"] == "ring" else "-"
        lines.append(
            f"| {row['strategy']} | {row['layout']} | {row['data']} | {row['P']} | {row['balance']:.3f} "
            f"| {row['efficiency']:.3f} | {lock} | {fmt_bytes(row['bytes_forward'])} "
            f"| {fmt_bytes(row['bytes_backward'])} |")
    return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def plot(rows, cps, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = sorted({row["data"] for row in rows}, key=lambda d: d != "one_doc")
    fig, axes = plt.subplots(1, len(datas), figsize=(6 * len(datas), 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, data in zip(axes, datas):
        for name, marker in zip(LAYOUT_NAMES, "osD"):
            pts = [(r["P"], r["balance"]) for r in rows
                   if r["data"] == data and r["layout"] == name and r["strategy"] == "ring"]
            ax.plot([p for p, _ in pts], [b for _, b in pts], marker=marker, label=f"{name}")
            lock = [(r["P"], r["lockstep_over_mean"]) for r in rows
                    if r["data"] == data and r["layout"] == name and r["strategy"] == "ring"]
            ax.plot([p for p, _ in lock], [b for _, b in lock], marker=marker, linestyle=":",
                    alpha=0.6, label=f"{name} (ring lock-step)")
        ps = np.array(cps, dtype=float)
        if data == "one_doc":
            ax.plot(ps, (2 * ps - 1) / ps, color="black", linestyle="--", linewidth=0.8,
                    label="(2P-1)/P: contiguous, exact")
            ax.plot(ps, 2 * ps / (ps + 1), color="grey", linestyle="--",
                    label="2P/(P+1): Striped Attention ceiling")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cps, [str(p) for p in cps])
        ax.set_xlabel("context-parallel ranks P")
        ax.set_title(f"causal, {data}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("work balance max/mean (ring = allgather)")
    for ax in axes:
        ax.legend(fontsize=7)
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
    parser.add_argument("--h-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kv-dtype", default="bf16", choices=sorted(DTYPE_BYTES))
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
    shape = {"batch": args.batch, "h_kv": args.h_kv, "head_dim": args.head_dim, "kv_dtype": args.kv_dtype,
             "acc_dtype": "fp64" if args.kv_dtype == "fp64" else "fp32"}
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
    rows = []
    for data, doc in docs.items():
        for name in LAYOUT_NAMES:
            for cp in args.cp:
                w = work_matrix(name, cp, doc, causal, args.window)
                work = w.sum(axis=1)
                mean = work.mean()
                # ring step i: rank r computes on the block of rank (r - i) mod P
                steps = [max(int(w[r, (r - i) % cp]) for r in range(cp)) for i in range(cp)]
                for strategy in STRATEGIES:
                    nbytes = bytes_per_rank(strategy, cp, args.seq_len, shape)
                    rows.append({
                        "strategy": strategy, "layout": name, "data": data, "P": cp,
                        "work_per_rank": [int(x) for x in work],
                        "work_total": int(work.sum()),
                        "balance": float(work.max() / mean),
                        "slowdown_vs_ideal": float(work.max() / mean),
                        "efficiency": float(mean / work.max()),
                        "ring_step_max_pairs": steps if strategy == "ring" else None,
                        "lockstep_over_mean": float(sum(steps) / mean) if strategy == "ring" else None,
                        "bytes_forward": nbytes["forward"],
                        "bytes_backward": nbytes["backward"],
                        "bytes_forward_per_rank": [nbytes["forward"]] * cp,
                        "bytes_backward_per_rank": [nbytes["backward"]] * cp,
                    })
    t_figures = time.time() - t0 - t_check

    # 3) the real strategies' counters at a small size (optional)
    validation = {"skipped": True}
    if not args.no_validate:
        validation = validate_with_real_strategies(args.validate_cp, seq_len=64, seed=args.seed)
    elapsed = time.time() - t0

    table = markdown_table(rows, args.table_cp)
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
            "strategies": list(STRATEGIES), "layouts": list(LAYOUT_NAMES),
            "model_shape": shape, "coord_bytes": COORD_BYTES,
            "data": {
                "one_doc": "one document of seq_len tokens",
                "packed": {"distribution": "log-normal, last document cut to fill seq_len",
                           "seed": args.seed, "median": args.doc_median, "sigma": args.doc_sigma,
                           "num_docs": len(lengths), "max_len": max(lengths),
                           "lengths": lengths},
            },
            "work_definition": "unmasked (query, key) pairs of the rank's queries against the full sequence "
                               "(ring: summed over its P blocks; allgather: one call), forward; the backward "
                               "recomputes the same pairs",
        },
        "cross_check_count_visible_pairs": {**check, "seq_len": small},
        "validation_real_strategies": validation,
        "seconds": {"cross_check": round(t_check, 2), "figures": round(t_figures, 2), "total": round(elapsed, 2)},
        "rows": rows,
        "markdown_table": table,
    }
    (args.out / "cp_balance.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.cp, args.out / "cp_balance.png")
    print(table)
    print(f"\ncross-check vs count_visible_pairs: {check['counts_compared']} counts equal (seq_len {small}); "
          f"real strategies: {'skipped' if validation.get('skipped') else 'counters match'}; {elapsed:.1f}s")
    print(f"wrote {args.out / 'cp_balance.json'} and {args.out / 'cp_balance.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
