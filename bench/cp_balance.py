"""Context-parallel work balance and traffic per rank (CPU only, no timers).

For every strategy (ring, allgather, ulysses, usp, tree) x layout x data setting x P this
benchmark reports each rank's work (unmasked (query, key) pairs, as the strategy's
``AttentionCounters`` count them) and the bytes and messages it sends per attention layer,
forward and backward, for a model shape given on the command line (default Llama-3-8B-like:
32 query heads, h_kv=8, head_dim=128, bf16, batch 1). The figures come from the analytic model
in ``lctrain.attention.balance`` (its docstring says how each strategy reads the work matrix
and ``traffic_per_rank`` holds the byte formulas); this script checks that model twice:

1. its pair counts against the project's mask rule (``count_visible_pairs``) on every
   configuration at a small sequence length: row sums, column sums and one off-diagonal block
   per rank;
2. (unless --no-validate) the five real strategies on gloo ranks at a small size: bytes,
   messages and pairs per phase and per rank must equal the model exactly.

Balance = max/mean of work over ranks: with compute-bound attention the slowest rank sets the
step time, so it is the slowdown against a perfectly even split (efficiency = mean/max). For
ring (and the ring inside usp) the lock-step figure sums the slowest rank's work over the ring
steps: a rank cannot start step i+1 before its neighbour's block has arrived.

Run:  python bench/cp_balance.py            (--dry-run: tiny sizes, files to a temp dir)
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from lctrain.attention import AttentionCounters, Coords, Mask, get_layout
from lctrain.attention.balance import (
    COORD_BYTES, DTYPE_BYTES, STRATEGIES, ModelShape, docs_from_lengths, lognormal_doc_lengths, one_document,
    skip_reason, strategy_work, traffic_per_rank, work_matrix)
from lctrain.attention.layouts import LAYOUT_NAMES
from lctrain.benchmarking import add_output_options, fmt_bytes, output_dir, pyplot, write_record
from lctrain.distributed.spawn import run_ranks
from lctrain_kernels.mask import count_visible_pairs

RESULTS = Path(__file__).resolve().parent / "results"
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
DATA_SETTINGS = ("one_doc", "packed")


def data_settings(seq_len: int, seed: int, median: float, sigma: float) -> dict[str, np.ndarray]:
    """Document ids of the two settings: one document, and log-normal documents packed."""
    return {"one_doc": one_document(seq_len),
            "packed": docs_from_lengths(lognormal_doc_lengths(seq_len, seed, median, sigma))}


# ----------------------------------------------------------------------------- check 1: mask rule


def _shard_coords(layout, doc_t: torch.Tensor, rank: int) -> Coords:
    pos = layout.positions(doc_t.shape[0], rank)
    return Coords(pos, doc_t[pos])


def cross_check(cps, docs: dict, mask: Mask) -> dict:
    """The model's counts == ``count_visible_pairs`` for every rank's row, column and one block."""
    checked = 0
    for data, doc in docs.items():
        doc_t = torch.from_numpy(doc)
        everything = Coords(torch.arange(doc.shape[0]), doc_t)
        for name in LAYOUT_NAMES:
            for cp in cps:
                layout = get_layout(name, cp)
                w = work_matrix(layout, doc, mask)
                shards = [_shard_coords(layout, doc_t, r) for r in range(cp)]
                for r in range(cp):
                    j = (r + 1) % cp
                    expected = {"row": (shards[r], everything, w[r].sum()),
                                "column": (everything, shards[r], w[:, r].sum()),  # tree's keys side
                                "block": (shards[r], shards[j], w[r, j])}
                    for what, (q, k, want) in expected.items():
                        got = int(count_visible_pairs(q, k, mask))
                        assert got == int(want), (data, name, cp, r, what, got, int(want))
                        checked += 1
    return {"ok": True, "counts_compared": checked}


# ----------------------------------------------------------------------------- check 2: real strategies


def _attention_functions(usp_groups) -> dict:
    from lctrain.attention.strategies.allgather import allgather_attention
    from lctrain.attention.strategies.ring import ring_attention
    from lctrain.attention.strategies.tree import tree_attention
    from lctrain.attention.strategies.ulysses import ulysses_attention
    from lctrain.attention.strategies.usp import usp_attention

    functions = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention,
                 "tree": functools.partial(tree_attention, query_chunk=None)}
    if usp_groups is not None:
        functions["usp"] = functools.partial(usp_attention, ulysses_group=usp_groups[0], ring_group=usp_groups[1])
    return functions


def _random_shards(shape: ModelShape, seq_len: int, layout, rank: int):
    gen = torch.Generator().manual_seed(0)
    dtype = TORCH_DTYPES[shape.dtype]
    sizes = {"q": shape.heads, "k": shape.h_kv, "v": shape.h_kv}
    full = [torch.randn(shape.batch, seq_len, heads, shape.head_dim, generator=gen).to(dtype)
            for heads in sizes.values()]
    return [layout.shard(x, rank, dim=1).requires_grad_() for x in full]


def _rank_counters(rank, world_size, cases, shape: ModelShape, ulysses: int):
    """Run the real strategies once per case on this gloo rank; return its counters per phase."""
    import torch.distributed as dist

    from lctrain.distributed.groups import build_parallel_groups

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    usp_groups = None
    if any(strategy == "usp" for strategy, _, _ in cases):
        usp_groups = build_parallel_groups(rank, world_size, 1, world_size, ulysses_size=ulysses).usp_groups
    functions = _attention_functions(usp_groups)
    results = []
    for strategy, layout_name, doc_list in cases:
        doc = torch.tensor(doc_list, dtype=torch.long)
        layout = get_layout(layout_name, world_size)
        q, k, v = _random_shards(shape, doc.shape[0], layout, rank)
        counters = AttentionCounters()
        out, _ = functions[strategy](q, k, v, _shard_coords(layout, doc, rank), mask=Mask(causal=True),
                                     counters=counters)
        out.float().sum().backward()
        results.append({phase: dict(values) for phase, values in counters.per_phase.items()})
    return results


def _applicable(cps, shape: ModelShape, ulysses: int) -> tuple[dict[int, list[str]], list[dict]]:
    """Strategies that run at each P, and the skipped ones with the reason."""
    runs, skipped = {}, []
    for cp in cps:
        runs[cp] = []
        for strategy in STRATEGIES:
            reason = skip_reason(strategy, cp, shape, ulysses)
            if reason is None:
                runs[cp].append(strategy)
            else:
                skipped.append({"strategy": strategy, "P": cp, "why": reason})
    return runs, skipped


def validate_with_real_strategies(cps, seq_len: int, seed: int, ulysses: int) -> dict:
    """Counters of the real strategies (gloo, small shape) against the model, exactly.

    Per rank and per phase: bytes_sent == ``traffic_per_rank``, messages_sent == its message
    count, pairs == ``strategy_work`` (for usp the per-ring-step integer split, so the
    comparison is per rank, not just per group).
    """
    shape = ModelShape(batch=1, heads=4, h_kv=2, head_dim=8, dtype="bf16")  # h_kv=2: K/V replicated at P=4
    mask = Mask(causal=True)
    docs = data_settings(seq_len, seed, median=8, sigma=1.0)
    runs, skipped = _applicable(cps, shape, ulysses)
    report = []
    for cp in cps:
        cases = [(s, name, data) for s in runs[cp] for name in LAYOUT_NAMES for data in docs]
        per_rank = run_ranks(_rank_counters, cp, [(s, name, docs[data].tolist()) for s, name, data in cases],
                             shape, ulysses)
        for i, (strategy, name, data) in enumerate(cases):
            work = strategy_work(strategy, work_matrix(get_layout(name, cp), docs[data], mask), ulysses)
            want = asdict(traffic_per_rank(strategy, cp, seq_len, shape, ulysses))
            for r in range(cp):
                for phase in ("forward", "backward"):
                    expect = {"pairs": work.per_rank[r], "bytes_sent": want[phase],
                              "messages_sent": want[f"messages_{phase}"]}
                    got = per_rank[r][i][phase]
                    assert got == expect, (strategy, name, data, cp, r, phase, got, expect)
            report.append({"strategy": strategy, "layout": name, "data": data, "P": cp, "ok": True})
    return {"ok": True, "seq_len": seq_len, "shape": asdict(shape), "usp_ulysses": ulysses,
            "compared": "per rank and phase: bytes_sent, messages_sent, pairs (exact equality)",
            "cases": report, "not_applicable": skipped}


# ----------------------------------------------------------------------------- figures


def figure_row(strategy: str, name: str, data: str, cp: int, w: np.ndarray, seq_len: int, shape: ModelShape,
               ulysses: int) -> dict:
    work = strategy_work(strategy, w, ulysses)
    assert work.total == int(w.sum()), (strategy, name, data, cp)  # every strategy: the same total
    traffic = traffic_per_rank(strategy, cp, seq_len, shape, ulysses)
    return {
        "strategy": strategy, "layout": name, "data": data, "P": cp,
        "ulysses_degree": ulysses if strategy == "usp" else (cp if strategy == "ulysses" else None),
        "work_per_rank": work.per_rank, "work_total": work.total,
        "balance": work.balance, "slowdown_vs_ideal": work.balance, "efficiency": 1 / work.balance,
        "ring_step_max_pairs": work.ring_step_max, "lockstep_over_mean": work.lockstep_over_mean,
        "bytes_forward": traffic.forward, "bytes_backward": traffic.backward,
        "bytes_forward_per_rank": [traffic.forward] * cp, "bytes_backward_per_rank": [traffic.backward] * cp,
        "messages_forward": traffic.messages_forward, "messages_backward": traffic.messages_backward,
    }


def figure_rows(docs: dict, cps, seq_len: int, shape: ModelShape, ulysses: int, mask: Mask) -> list[dict]:
    runs, _ = _applicable(cps, shape, ulysses)
    rows = []
    for data, doc in docs.items():
        for name in LAYOUT_NAMES:
            for cp in cps:
                w = work_matrix(get_layout(name, cp), doc, mask)
                rows += [figure_row(s, name, data, cp, w, seq_len, shape, ulysses) for s in runs[cp]]
    return rows


def _index(rows) -> dict:
    return {(r["strategy"], r["layout"], r["data"], r["P"]): r for r in rows}


def _with_lockstep(row) -> str:
    lock = row["lockstep_over_mean"]
    return f"{row['balance']:.3f}" + ("" if lock is None else f" ({lock:.3f})")


def _balance_cell(row) -> str:
    return "n/a" if row is None else _with_lockstep(row)


def markdown_table(rows, cps) -> str:
    """Every row for P in ``cps`` (stdout and JSON)."""
    lines = ["| strategy | layout | data | P | balance max/mean | efficiency mean/max | lock-step max/mean "
             "| bytes/rank/layer fwd | bytes/rank/layer bwd | messages fwd/bwd |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in (r for r in rows if r["P"] in cps):
        lock = "-" if row["lockstep_over_mean"] is None else f"{row['lockstep_over_mean']:.3f}"
        lines.append(
            f"| {row['strategy']} | {row['layout']} | {row['data']} | {row['P']} | {row['balance']:.3f} "
            f"| {row['efficiency']:.3f} | {lock} | {fmt_bytes(row['bytes_forward'])} "
            f"| {fmt_bytes(row['bytes_backward'])} | {row['messages_forward']}/{row['messages_backward']} |")
    return "\n".join(lines)


COMPACT_ROWS = (("ring", "contiguous"), ("ring", "zigzag"), ("ring", "striped"), ("ulysses", "striped"),
                ("usp", "contiguous"), ("usp", "striped"), ("tree", "contiguous"), ("tree", "zigzag"),
                ("tree", "striped"))


def _label(strategy: str, ulysses: int) -> str:
    return {"ring": "ring / allgather", "usp": f"usp U={ulysses}"}.get(strategy, strategy)


def compact_tables(rows, cps, ulysses: int) -> str:
    """README tables: balance per (strategy, layout) at the table P's; traffic per strategy."""
    index = _index(rows)
    head = " | ".join(f"{d} P={p}" for d in DATA_SETTINGS for p in cps)
    lines = [f"| strategy | layout | {head} |", "|---|---|" + "---|" * (len(DATA_SETTINGS) * len(cps))]
    for strategy, layout in COMPACT_ROWS:
        cells = [_balance_cell(index.get((strategy, layout, data, cp))) for data in DATA_SETTINGS for cp in cps]
        lines.append(f"| {_label(strategy, ulysses)} | {'any' if strategy == 'ulysses' else layout} "
                     f"| {' | '.join(cells)} |")
    lines += ["", "| strategy | " + " | ".join(f"P={p} fwd | P={p} bwd | P={p} msgs" for p in cps) + " |",
              "|---|" + "---|" * (3 * len(cps))]
    for strategy in STRATEGIES:
        cells = []
        for cp in cps:
            row = index.get((strategy, "striped", "one_doc", cp))
            cells += (["n/a"] * 3 if row is None else
                      [fmt_bytes(row["bytes_forward"]), fmt_bytes(row["bytes_backward"]),
                       f"{row['messages_forward']}/{row['messages_backward']}"])
        label = "ring" if strategy == "ring" else _label(strategy, ulysses)
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def all_p_table(rows, cps) -> str:
    """Balance for every P: ring (lock-step) / tree, per layout and data."""
    index = _index(rows)
    lines = ["| layout | data | " + " | ".join(f"P={p}" for p in cps) + " |", "|---|---|" + "---|" * len(cps)]
    for data in DATA_SETTINGS:
        for name in LAYOUT_NAMES:
            cells = [f"{_with_lockstep(index['ring', name, data, cp])} / {index['tree', name, data, cp]['balance']:.3f}"
                     for cp in cps]
            lines.append(f"| {name} | {data} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(rows, cps, path: Path, ulysses: int) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(DATA_SETTINGS), figsize=(6.5 * len(DATA_SETTINGS), 4.8), sharey=True)

    def series(data, name, strategy, key="balance"):
        pts = [(r["P"], r[key]) for r in rows if (r["data"], r["layout"], r["strategy"]) == (data, name, strategy)]
        return [p for p, _ in pts], [b for _, b in pts]

    for ax, data in zip(np.atleast_1d(axes), DATA_SETTINGS):
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
            ax.plot(ps, 2 * ps / (ps + 1), color="grey", linestyle="--", label="2P/(P+1): Striped Attention ceiling")
        ax.axhline(1.0, color="black", linewidth=0.5, label="ulysses (any layout)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cps, [str(p) for p in cps])
        ax.set(xlabel="context-parallel ranks P", title=f"causal, {data}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    np.atleast_1d(axes)[0].set_ylabel("work balance max/mean")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv):
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
    parser.add_argument("--no-validate", action="store_true", help="skip running the real strategies on gloo ranks")
    parser.add_argument("--validate-cp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--table-cp", type=int, nargs="+", default=[4, 8])
    add_output_options(parser, "tiny sizes (256 tokens, P = 2 and 4, gloo check at P = 4)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seq_len, args.cp, args.check_seq_len, args.validate_cp, args.table_cp = 256, [2, 4], 128, [4], [2, 4]
        args.doc_median = 32.0
    args.out = output_dir(args, "cp_balance", RESULTS)
    if args.heads % args.h_kv:
        parser.error("--heads must be a multiple of --h-kv (GQA)")
    for cp in args.cp:
        if args.seq_len % (2 * cp) or args.check_seq_len % (2 * cp):
            parser.error(f"--seq-len and --check-seq-len must be multiples of 2P = {2 * cp} (zigzag)")
    return args


def parameters(args, shape: ModelShape, mask: Mask, lengths: list[int]) -> dict:
    return {
        "seq_len": args.seq_len, "cp": args.cp, "causal": mask.causal, "window": mask.window,
        "strategies": list(STRATEGIES), "layouts": list(LAYOUT_NAMES), "usp_ulysses": args.usp_ulysses,
        "tree_query_chunk": None, "model_shape": {**asdict(shape), "acc_dtype": shape.acc_dtype},
        "coord_bytes": COORD_BYTES,
        "data": {"one_doc": "one document of seq_len tokens",
                 "packed": {"distribution": "log-normal, last document cut to fill seq_len", "seed": args.seed,
                            "median": args.doc_median, "sigma": args.doc_sigma, "num_docs": len(lengths),
                            "max_len": max(lengths), "lengths": lengths}},
        "work_definition": "unmasked (query, key) token pairs the rank's AttentionCounters report, forward (the "
                           "backward reports the same); per strategy see lctrain.attention.balance",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    mask, ulysses = Mask(causal=True, window=args.window), args.usp_ulysses
    shape = ModelShape(args.batch, args.heads, args.h_kv, args.head_dim, args.kv_dtype)
    lengths = lognormal_doc_lengths(args.seq_len, args.seed, args.doc_median, args.doc_sigma)
    docs = {"one_doc": one_document(args.seq_len), "packed": docs_from_lengths(lengths)}

    small = data_settings(args.check_seq_len, args.seed, args.doc_median / 8, args.doc_sigma)
    check = cross_check(args.cp, small, mask)
    t_check = time.time() - t0
    rows = figure_rows(docs, args.cp, args.seq_len, shape, ulysses, mask)
    t_figures = time.time() - t0 - t_check
    validation = {"skipped": True}
    if not args.no_validate:
        validation = validate_with_real_strategies(args.validate_cp, seq_len=64, seed=args.seed, ulysses=ulysses)
    elapsed = time.time() - t0

    tables = {"markdown_table": markdown_table(rows, args.table_cp),
              "markdown_compact": compact_tables(rows, args.table_cp, ulysses),
              "markdown_balance_all_p": all_p_table(rows, args.cp)}
    path = write_record(args.out / "cp_balance.json", "cp_balance", {
        "parameters": parameters(args, shape, mask, lengths),
        "skipped": _applicable(args.cp, shape, ulysses)[1],
        "cross_check_count_visible_pairs": {**check, "seq_len": args.check_seq_len},
        "validation_real_strategies": validation,
        "seconds": {"cross_check": round(t_check, 2), "figures": round(t_figures, 2), "total": round(elapsed, 2)},
        "rows": rows, **tables}, argv)
    plot(rows, args.cp, args.out / "cp_balance.png", ulysses)
    print("\n\n".join(tables.values()))
    print(f"\ncross-check vs count_visible_pairs: {check['counts_compared']} counts equal "
          f"(seq_len {args.check_seq_len}); real strategies: "
          f"{'skipped' if validation.get('skipped') else 'counters match'}; {elapsed:.1f}s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
