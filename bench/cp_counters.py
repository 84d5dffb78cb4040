"""What instrumentation costs in the hot path: striped ring attention, forward + backward, on
gloo ranks, three ways in one run (interleaved, so machine noise hits all alike):

- ``raw``: ``ring_attention(..., counters=None)``, the strategy function alone;
- ``trainer``: the callable the trainer builds (``build_attention`` with its defaults:
  no counters, the shard-shape check once per step; here every call is a step, its worst case);
- ``counted``: the same with ``count=True`` (pairs counted on the device, bytes from shapes).

The figure is the median time per call of each and the ratios to ``raw``; the trainer's
default is meant to stay within 5% of ``raw``.

    python bench/cp_counters.py                 # 2 ranks, 4096 tokens, h 4, h_kv 2, d 32
    python bench/cp_counters.py --dry-run       # tiny sizes, output to a temp dir
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lctrain.attention import Coords, build_attention, get_layout
from lctrain.attention.strategies.ring import ring_attention
from lctrain.benchmarking import add_output_options, output_dir, pyplot, write_record
from lctrain.distributed.spawn import run_ranks

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("raw", "trainer", "counted")


def _time_calls(rank: int, world: int, args) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    layout = get_layout("striped", world)
    gen = torch.Generator().manual_seed(rank)
    local = args.seq_len // world
    q = torch.randn(1, local, args.heads, args.head_dim, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, local, args.kv_heads, args.head_dim, generator=gen, requires_grad=True)
            for _ in range(2))
    dout = torch.randn_like(q)
    pos = layout.positions(args.seq_len, rank)
    coords = Coords(pos, torch.zeros_like(pos))
    trainer_attn = build_attention("ring", layout)
    counted_attn = build_attention("ring", layout, count=True)

    def call(variant: str):
        if variant == "raw":
            return ring_attention(q, k, v, coords)[0]
        attn = trainer_attn if variant == "trainer" else counted_attn
        attn.begin_step()  # every call a new step: the shape check runs each time (worst case)
        return attn(q, k, v, coords)

    times = {variant: [] for variant in VARIANTS}
    for repeat in range(args.warmup + args.repeats):
        for variant in VARIANTS:
            dist.barrier()
            start = time.perf_counter()
            call(variant).backward(dout)
            elapsed = time.perf_counter() - start
            if repeat >= args.warmup:
                times[variant].append(elapsed)
    # Every rank's slowest call sets the pace: report the max over ranks per repeat.
    stacked = torch.tensor([times[v] for v in VARIANTS], dtype=torch.float64)
    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return {"times": {v: stacked[i].tolist() for i, v in enumerate(VARIANTS)},
            "pairs": counted_attn.counters.pairs, "messages": counted_attn.counters.messages_sent}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    add_output_options(parser, "256 tokens, 3 repeats")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seq_len, args.repeats, args.warmup = 256, 3, 1
    out = output_dir(args, "cp_counters", RESULTS)

    rank0 = run_ranks(_time_calls, args.world, args, timeout=900)[0]
    medians = {v: statistics.median(rank0["times"][v]) for v in VARIANTS}
    ratios = {v: medians[v] / medians["raw"] for v in VARIANTS}
    fields = {"world": args.world, "seq_len": args.seq_len, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "repeats": args.repeats, "threads_per_rank": 1,
              "median_s": medians, "ratio_to_raw": ratios, "times_s": rank0["times"],
              "counted_pairs_per_call": rank0["pairs"] // max(1, args.warmup + args.repeats),
              "counted_messages_per_call": rank0["messages"] // max(1, args.warmup + args.repeats)}
    path = write_record(out / "cp_counters.json", "cp_counters", fields, argv)
    for variant in VARIANTS:
        print(f"{variant:8s} {1e3 * medians[variant]:8.1f} ms per fwd+bwd  ({ratios[variant]:.3f}x raw)")
    print(f"wrote {path}")
    plt = pyplot(out / "cp_counters.png")
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(VARIANTS, [1e3 * medians[v] for v in VARIANTS], color=["#777", "#1f77b4", "#ff7f0e"])
        for i, v in enumerate(VARIANTS):
            ax.text(i, 1e3 * medians[v], f"{ratios[v]:.3f}x", ha="center", va="bottom")
        ax.set_ylabel("ms per forward + backward")
        ax.set_title(f"striped ring, {args.seq_len} tokens, {args.world} gloo ranks")
        fig.tight_layout()
        fig.savefig(out / "cp_counters.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
