"""Attention work balance and traffic of data-parallel ranks with skewed documents (CPU, no timers).

P data-parallel ranks each hold the same number of tokens (default 512k) as
whole documents with log-normal lengths (median 1k, sigma 2: many short
documents and a few of 64k-512k). Attention work grows with the square of a
document's length, so the rank holding the longest documents is a straggler.
Per rank, for one causal attention layer (forward; the backward recomputes the
same pairs), this reports work = visible (query, key) pairs, its max/mean, and
bytes moved, for:

- colocated: each rank computes its own documents (data parallel as is; 0 bytes);
- ring CP (contiguous / zigzag / striped): the P ranks' sequences packed into
  one sequence of P x tokens and sharded by the layout (the counting and byte
  formulas of ``lctrain.attention.balance``: K/V + coordinates around the ring);
- disagg colocated: lctrain.disagg plans tasks onto the P ranks themselves
  (whole documents, split only as balance needs); q/k/v of moved tasks go out
  and out/lse come back; tasks kept at home move nothing;
- disagg dedicated: the same onto K extra attention-server ranks (every byte moves);
- disagg colocated, 128-token chunks: every document pre-cut into 128-query
  tasks; shows what fine chunks cost in K/V copies (each causal chunk carries
  its document's prefix keys).

All of it is integer arithmetic on document lengths. The script asserts that
the disagg task costs, the colocated sums and the ring counts agree on the
total work, and that the ring count against all keys equals the searched count
(``visible_pairs``) on rank 0.

Run:  python bench/disagg_balance.py        (--dry-run: tiny sizes, files to a temp dir)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lctrain.attention.balance import (
    DTYPE_BYTES, ModelShape, doc_bounds, docs_from_lengths, lognormal_doc_lengths, pairs_against_all_keys,
    traffic_per_rank, visible_pairs)
from lctrain.attention.layouts import get_layout
from lctrain.benchmarking import add_output_options, fmt_bytes, output_dir, pyplot, write_record
from lctrain.disagg.protocol import NUM_FIELDS
from lctrain.disagg.scheduler import AttentionShape, plan_from_lengths
from lctrain.disagg.tasks import make_tasks, task_cost
from lctrain_kernels.mask import Mask

RESULTS = Path(__file__).resolve().parent / "results"
LONG_DOC = 65536


def ring_work(layout_name: str, cp: int, doc: np.ndarray, mask: Mask) -> list[int]:
    """Work per CP rank: its queries against the whole packed sequence (every key once).

    With all keys present the count per query is the length of its key interval, so no
    search is needed; rank 0 is checked against the searched count.
    """
    layout = get_layout(layout_name, cp)
    bounds = doc_bounds(doc)
    shards = [layout.positions(doc.shape[0], rank).numpy() for rank in range(cp)]
    work = [pairs_against_all_keys(pos, doc, mask, bounds) for pos in shards]
    assert work[0] == visible_pairs(shards[0], np.arange(doc.shape[0]), doc, mask, bounds), (layout_name, cp)
    return work


def balance_row(method: str, cp: int, work: list[int], sent: list[int], received: list[int], **extra) -> dict:
    mean = float(np.mean(work))
    return {"method": method, "P": cp, "work_per_rank": [int(w) for w in work], "work_total": int(sum(work)),
            "balance": max(work) / mean, "efficiency": mean / max(work),
            "bytes_sent_per_rank": [int(b) for b in sent], "bytes_received_per_rank": [int(b) for b in received],
            "bytes_sent_max": int(max(sent)), "bytes_received_max": int(max(received)),
            "bytes_moved_total": int(sum(sent)), **extra}


def disagg_row(method, cp, lengths, shape, args, **plan_kwargs) -> dict:
    t0 = time.time()
    plan = plan_from_lengths(lengths, shape, causal=True, window=args.window, target_imbalance=args.target,
                             min_chunk_tokens=args.min_chunk, **plan_kwargs)
    seconds = time.time() - t0
    moved = sum(t.server != t.task.worker for t in plan.tasks)
    return balance_row(method, cp, list(plan.server_loads), list(plan.bytes_sent), list(plan.bytes_received),
                       num_servers=len(plan.server_ranks), num_tasks=len(plan.tasks), tasks_moved=moved,
                       header_bytes_moved=moved * NUM_FIELDS * 8,
                       plan_seconds=round(seconds, 3))


def markdown_table(rows) -> str:
    lines = ["| method | P | servers | max/mean | tasks (moved) | bytes sent max/rank | bytes moved total |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        tasks = f"{row['num_tasks']} ({row['tasks_moved']})" if "num_tasks" in row else "-"
        lines.append(f"| {row['method']} | {row['P']} | {row.get('num_servers', row['P'])} | {row['balance']:.3f} "
                     f"| {tasks} | {fmt_bytes(row['bytes_sent_max'])} | {fmt_bytes(row['bytes_moved_total'])} |")
    return "\n".join(lines)


def plot(rows, cps, path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    methods = list(dict.fromkeys(row["method"] for row in rows))
    fig, (ax_bal, ax_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, marker in zip(methods, "osD^v<>p"):
        pts = [r for r in rows if r["method"] == method]
        style = "--" if method == "colocated" else "-"  # same as ring-contiguous: drawn on top of it
        ax_bal.plot([r["P"] for r in pts], [r["balance"] for r in pts], marker=marker, linestyle=style,
                    label=method)
        if any(r["bytes_moved_total"] for r in pts):  # colocated moves nothing: no point on a log axis
            ax_bytes.plot([r["P"] for r in pts], [r["bytes_moved_total"] / 2**30 for r in pts],
                          marker=marker, label=method)
    ax_bal.axhline(1.05, color="grey", linestyle="--", linewidth=0.8, label="1.05")
    ax_bal.set_ylabel("attention work max/mean over ranks (servers)")
    ax_bytes.set_ylabel("bytes moved per layer, forward, all ranks (GiB)")
    ax_bytes.set_yscale("log")
    for ax in (ax_bal, ax_bytes):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cps, [str(p) for p in cps])
        ax.set_xlabel("data-parallel ranks P")
        ax.grid(alpha=0.3)
    ax_bal.legend(fontsize=7)
    fig.suptitle("causal attention, skewed document mix: colocated vs ring CP vs disaggregated attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-rank", type=int, default=524288)
    parser.add_argument("--cp", type=int, nargs="+", default=[4, 8, 16], help="numbers of ranks P")
    parser.add_argument("--doc-median", type=float, default=1024.0)
    parser.add_argument("--doc-sigma", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0, help="rank r draws its documents with seed 1000*seed + r")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--h-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--target", type=float, default=1.05, help="scheduler target max/mean")
    parser.add_argument("--min-chunk", type=int, default=128, help="smallest query chunk the scheduler cuts")
    parser.add_argument("--dedicated-servers", type=int, default=None, help="K (default P)")
    parser.add_argument("--layouts", nargs="+", default=["contiguous", "zigzag", "striped"])
    add_output_options(parser, "tiny sizes (8k tokens per rank, P = 2 and 4)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.tokens_per_rank, args.cp, args.doc_median = 8192, [2, 4], 256.0
    args.out = output_dir(args, "disagg_balance", RESULTS)
    if args.tokens_per_rank % 2:
        parser.error("--tokens-per-rank must be even (zigzag splits each rank's share in two)")
    return args


def rows_at(cp: int, lengths: list[list[int]], shape: AttentionShape, ring_shape: ModelShape, args) -> list[dict]:
    """The rows of every method for P = ``cp`` ranks holding documents ``lengths``."""
    mask = Mask(causal=True, window=args.window)
    zeros = [0] * cp
    colocated = [sum(task_cost(t, True, args.window) for t in make_tasks(docs, r, True, args.window, None))
                 for r, docs in enumerate(lengths)]
    rows = [balance_row("colocated", cp, colocated, zeros, zeros)]
    doc = docs_from_lengths([n for docs in lengths for n in docs])
    for name in args.layouts:
        work = ring_work(name, cp, doc, mask)
        assert sum(work) == sum(colocated), (name, cp)
        fwd = traffic_per_rank("ring", cp, doc.shape[0], ring_shape).forward
        rows.append(balance_row(f"ring-{name}", cp, work, [fwd] * cp, [fwd] * cp))
    servers = args.dedicated_servers or cp
    for method, kwargs in (("disagg-colocated", {}),
                           ("disagg-dedicated", {"mode": "dedicated", "num_servers": servers}),
                           (f"disagg-colocated-chunk{args.min_chunk}", {"chunk_tokens": args.min_chunk})):
        rows.append(disagg_row(method, cp, lengths, shape, args, **kwargs))
        assert rows[-1]["work_total"] == sum(colocated), (method, cp)
    return rows


def parameters(args, shape: AttentionShape) -> dict:
    return {
        "tokens_per_rank": args.tokens_per_rank, "cp": args.cp, "causal": True, "window": args.window,
        "doc_lengths": {"distribution": "log-normal per rank, last document cut to fill the rank",
                        "median": args.doc_median, "sigma": args.doc_sigma, "seed": args.seed},
        "attention_shape": asdict(shape),
        "target_imbalance": args.target, "min_chunk_tokens": args.min_chunk,
        "dedicated_servers": args.dedicated_servers or "P", "ring_layouts": args.layouts,
        "work_definition": "visible (query, key) pairs per rank (per server for disagg), one causal layer, "
                           "forward; the backward recomputes the same pairs",
        "bytes_definition": "forward, one layer, batch 1. ring: (P-1) x (K/V shard + int64 pos/doc) per rank "
                            "(lctrain.attention.balance.traffic_per_rank). disagg: per moved task q, k, v "
                            "worker->server and out (dtype), lse (fp32) server->worker; task headers listed apart "
                            "(header_bytes_moved); tasks computed on their own rank move 0 bytes",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    shape = AttentionShape(args.heads, args.h_kv, args.head_dim, DTYPE_BYTES[args.dtype], lse_bytes=4)
    ring_shape = ModelShape(batch=1, heads=args.heads, h_kv=args.h_kv, head_dim=args.head_dim, dtype=args.dtype)
    all_lengths = [lognormal_doc_lengths(args.tokens_per_rank, 1000 * args.seed + r, args.doc_median,
                                         args.doc_sigma) for r in range(max(args.cp))]
    rows = [row for cp in args.cp for row in rows_at(cp, all_lengths[:cp], shape, ring_shape, args)]
    elapsed = time.time() - t0

    table = markdown_table(rows)
    data = [{"rank": r, "num_docs": len(docs), "max_len": max(docs), "docs_ge_64k": sum(n >= LONG_DOC for n in docs),
             "lengths_ge_64k": [n for n in docs if n >= LONG_DOC]} for r, docs in enumerate(all_lengths)]
    path = write_record(args.out / "disagg_balance.json", "disagg_balance", {
        "parameters": parameters(args, shape), "data": data,
        "checks": "disagg server loads, colocated sums and ring per-rank work sum to the same total for every P; "
                  "ring rank 0 against all keys equals the searched count (lctrain.attention.balance)",
        "seconds": round(elapsed, 2), "rows": rows, "markdown_table": table}, argv)
    print(table)
    print(f"\nranks' documents >= 64k tokens: {[d['docs_ge_64k'] for d in data]}; {elapsed:.1f}s")
    print(f"wrote {path}")
    plot(rows, args.cp, args.out / "disagg_balance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
