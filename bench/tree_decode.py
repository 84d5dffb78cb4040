"""Tree vs ring combination of sharded-KV-cache attention for one decoded token.

Measured (CPU, gloo, P = 2..8 processes): every rank holds a shard of a
``--total-tokens`` KV cache (default 64k tokens, h_kv = 8, head_dim = 128,
32 query heads, fp32), computes the partial attention of one new query against
it (``local_partial``, i.e. ``blockwise_forward`` with coordinates) and the
partials are combined with ``tree_combine`` (all-reduce MAX + all-reduce SUM)
or ``butterfly_combine`` (log2 P P2P swap-and-merge rounds: the tree written
out in P2P, since gloo's all-reduce is itself a ring) or ``ring_combine``
(P - 1 sequential merges + broadcast), exactly as
``lctrain.decode`` does per layer. Reported per decoded token and layer:
collective calls, sequential hops, latency steps, bytes sent (from the
``DecodeCounters``), and the median wall time of the combine (the slowest rank
per step) and of the local partial. With P up to 8 processes on a 2-core
machine the runs are oversubscribed: wall times there measure the OS scheduler
as much as the algorithms; the counts are exact.

Modelled (``cost_model``): per layer and decoded token,
  tree  = t_local + 2 kernels + allreduce(h*4 B) + allreduce(h*(d+1)*4 B),
          allreduce = reduce + broadcast along a tree: 2 * sum over its levels of
          (alpha + bytes / bw), log2(min(P, g)) NVLink levels then
          log2(P / g) InfiniBand levels (g GPUs per node);
  butterfly = t_local + per level (alpha + partial bytes / bw + one merge kernel);
  ring  = t_local + (P-1) hops of (alpha + bytes / bw + one merge kernel) along
          the ring (P/g - 1 of them over InfiniBand) + a tree broadcast of the result;
  ring attention (K/V rotation, the Tree Attention paper's baseline)
        = t_local + (P-1) steps of max(alpha + kv_shard_bytes / bw, t_local),
          the step bound by InfiniBand once the ring spans nodes;
  t_local = KV shard bytes (bf16 K and V) / HBM bandwidth + one kernel launch.
Bandwidths (``NETWORK``): NVLink 450 GB/s per direction and HBM3 3.35 TB/s are the H100 SXM
figures; InfiniBand ~50 GB/s per GPU assumes one NDR (400 Gb/s) adapter per GPU; the latencies
and the kernel launch time are assumptions (flags).

Run:  python bench/tree_decode.py        (~1-2 min on 2 cores; --dry-run: tiny sizes, temp dir)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

from lctrain.attention import CAUSAL, Coords
from lctrain.benchmarking import add_output_options, output_dir, pyplot, write_record
from lctrain.decode.combine import (
    DecodeCounters, butterfly_combine, decode_comm, local_partial, ring_combine, tree_combine)
from lctrain.distributed.spawn import run_ranks

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {"tree": tree_combine, "butterfly": butterfly_combine, "ring": ring_combine}
# H100 SXM: NVLink 4 450 GB/s per direction, HBM3 3.35 TB/s; InfiniBand: assumed one NDR 400 Gb/s
# adapter per GPU (~50 GB/s); 8 GPUs per node. Latencies and kernel launch come from the flags.
NETWORK = {"bw_nvl": 450e9, "bw_ib": 50e9, "hbm_bw": 3.35e12, "per_node": 8,
           "source": "bandwidths: NVLink 450 GB/s per direction and HBM3 3.35 TB/s are the H100 SXM figures; "
                     "InfiniBand ~50 GB/s per GPU assumes one NDR 400 Gb/s adapter per GPU; latencies and "
                     "kernel launch: assumed (see flags)"}


# ----------------------------------------------------------------- measured
def _cache_shard(rank: int, world: int, args):
    """This rank's striped shard of the KV cache and its coordinates, and the new token's."""
    gen = torch.Generator().manual_seed(rank)
    shard = args.total_tokens // world
    k, v = (torch.randn(1, shard, args.kv_heads, args.head_dim, generator=gen) for _ in range(2))
    k_pos = torch.arange(rank, args.total_tokens, world)
    k_coords = Coords(k_pos, torch.zeros_like(k_pos))
    q_coords = Coords(torch.tensor([[args.total_tokens]]), torch.tensor([[0]]))
    return k, v, k_coords, q_coords


def _timed_combines(out, lse, group) -> tuple[dict, dict]:
    """Seconds and counters of each combine of the same partial."""
    import torch.distributed as dist

    seconds, counts = {}, {}
    for name, combine in METHODS.items():
        comm = decode_comm(group, DecodeCounters())
        dist.barrier()
        start = time.perf_counter()
        combine(out, lse, comm)
        seconds[name] = time.perf_counter() - start
        c = comm.counters
        counts[name] = {"collectives": c.collectives, "hops": c.hops, "latency_steps": c.latency_steps,
                        "bytes_sent": c.bytes_sent}
    return seconds, counts


def _rank_times(rank, world, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    k, v, k_coords, q_coords = _cache_shard(rank, world, args)
    times = {"local": [], **{name: [] for name in METHODS}}
    for step in range(args.warmup + args.steps):
        q = torch.randn(1, 1, args.heads, args.head_dim, generator=torch.Generator().manual_seed(10_000 + step))
        dist.barrier()
        start = time.perf_counter()
        out, lse = local_partial(q, k, v, q_coords, k_coords, CAUSAL)
        elapsed = {"local": time.perf_counter() - start}
        seconds, counts = _timed_combines(out, lse, dist.group.WORLD)
        if step >= args.warmup:
            for name, value in {**elapsed, **seconds}.items():
                times[name].append(value)
    return {"times": times, "counts": counts}


def measure(world: int, args) -> dict:
    ranks = run_ranks(_rank_times, world, args, timeout=600)
    slowest = {name: [max(r["times"][name][i] for r in ranks) for i in range(args.steps)]
               for name in ("local", *METHODS)}
    row = {"P": world, "oversubscribed": world > (os.cpu_count() or 1),
           "local_partial_ms": 1e3 * statistics.median(slowest["local"])}
    for name in METHODS:
        row[name] = {**ranks[0]["counts"][name],
                     "bytes_sent_max_rank": max(r["counts"][name]["bytes_sent"] for r in ranks),
                     "combine_ms": 1e3 * statistics.median(slowest[name])}
    return row


# ------------------------------------------------------------------ modelled
def _levels(world: int, per_node: int) -> list[str]:
    """Tree levels from the leaves: NVLink inside a node, then InfiniBand across nodes."""
    inner = math.ceil(math.log2(min(world, per_node))) if world > 1 else 0
    outer = math.ceil(math.log2(math.ceil(world / per_node))) if world > per_node else 0
    return ["nvl"] * inner + ["ib"] * outer


def cost_model(world: int, total_tokens: int, net: dict, shape: dict) -> dict:
    """Modelled seconds per layer and decoded token for tree, ring (partials) and ring attention."""
    h, h_kv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    link = {"nvl": (net["alpha_nvl"], net["bw_nvl"]), "ib": (net["alpha_ib"], net["bw_ib"])}
    kv_shard = total_tokens / world * h_kv * d * 2 * shape["kv_bytes"]
    t_local = kv_shard / net["hbm_bw"] + net["kernel"]
    partial_bytes = h * (d + 1) * 4

    def tree_pass(nbytes):  # one sweep down or up the tree
        return sum(link[lv][0] + nbytes / link[lv][1] for lv in _levels(world, net["per_node"]))

    tree = t_local + 2 * net["kernel"] + 2 * tree_pass(h * 4) + 2 * tree_pass(partial_bytes)
    # recursive doubling: one swap + merge kernel per level, every rank ends with the result
    butterfly = t_local + sum(link[lv][0] + partial_bytes / link[lv][1] + net["kernel"]
                              for lv in _levels(world, net["per_node"]))
    ib_hops = math.ceil(world / net["per_node"]) - 1
    nvl_hops = world - 1 - ib_hops
    hop = lambda lv: link[lv][0] + partial_bytes / link[lv][1] + net["kernel"]  # noqa: E731
    ring = t_local + nvl_hops * hop("nvl") + ib_hops * hop("ib") + tree_pass(partial_bytes)
    step_link = link["ib" if world > net["per_node"] else "nvl"]
    ring_kv = t_local + (world - 1) * max(step_link[0] + kv_shard / step_link[1], t_local)
    steps = 2 * 2 * len(_levels(world, net["per_node"]))
    return {"P": world, "tree_us": 1e6 * tree, "butterfly_us": 1e6 * butterfly, "ring_us": 1e6 * ring,
            "ring_attention_us": 1e6 * ring_kv,
            "local_us": 1e6 * t_local, "tree_latency_steps": steps,
            "ring_latency_steps": world - 1 + len(_levels(world, net["per_node"])),
            "speedup_vs_ring": ring / tree, "speedup_vs_ring_attention": ring_kv / tree,
            "butterfly_speedup_vs_ring": ring / butterfly}


# ---------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ps", default="2,4,8", help="measured process counts")
    p.add_argument("--total-tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=15, help="timed decode steps per P")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model-ps", default="2,8,16,64,128,512")
    p.add_argument("--model-tokens", default="65536,1048576", help="contexts for the cost model")
    p.add_argument("--alpha-nvl-us", type=float, default=2.0, help="assumed NVLink per-hop latency")
    p.add_argument("--alpha-ib-us", type=float, default=5.0, help="assumed InfiniBand per-hop latency")
    p.add_argument("--kernel-us", type=float, default=3.0, help="assumed GPU kernel launch per small step")
    add_output_options(p, "P = 2, 1024 cached tokens, 2 steps")
    args = p.parse_args(argv)
    if args.dry_run:
        args.ps, args.total_tokens, args.steps, args.warmup = "2", 1024, 2, 1
    args.out = output_dir(args, "tree_decode", RESULTS)
    return args


def sensitivity(tokens: int, net: dict, shape: dict) -> dict:
    """Modelled tree speed-up over ring at P = 64 and 512 for other assumed latencies."""
    def speedups(**changed):
        return {w: cost_model(w, tokens, {**net, **changed}, shape)["speedup_vs_ring"] for w in (64, 512)}

    return {**{f"alpha_ib_us={a}": speedups(alpha_ib=a * 1e-6) for a in (2.0, 5.0, 10.0)},
            **{f"kernel_us={k}": speedups(kernel=k * 1e-6) for k in (0.0, 3.0)}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    measured = [measure(int(x), args) for x in args.ps.split(",")]
    net = {"alpha_nvl": args.alpha_nvl_us * 1e-6, "alpha_ib": args.alpha_ib_us * 1e-6,
           "kernel": args.kernel_us * 1e-6, **NETWORK}
    shape = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "kv_bytes": 2}
    tokens = [int(n) for n in args.model_tokens.split(",")]
    model = {n: [cost_model(int(w), n, net, shape) for w in args.model_ps.split(",")] for n in tokens}
    result = {
        "args": {**vars(args), "out": str(args.out)}, "backend": "gloo",
        "note": "P processes on os.cpu_count() cores: P > cores is oversubscribed, wall times are then "
                "dominated by scheduling; counts and bytes are exact per rank (rank 0 shown).",
        "measured": measured, "network_model": net, "model_shape": shape, "modelled": model,
        f"sensitivity_speedup_vs_ring_{tokens[0] // 1024}k": sensitivity(tokens[0], net, shape),
        "wall_s": time.perf_counter() - start,
    }
    path = write_record(args.out / "tree_decode.json", "tree_decode", result, argv, indent=2)
    print(markdown(result, os.cpu_count()))
    _plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")
    return result


def markdown(result: dict, cores: int) -> str:
    lines = [f"Measured per decoded token and layer, {result['args']['total_tokens']} cached tokens total, "
             f"h={result['args']['heads']} h_kv={result['args']['kv_heads']} d={result['args']['head_dim']} fp32, "
             f"gloo on {cores} CPU cores (P > {cores}: oversubscribed)", "",
             "| P | method | collectives | seq. hops | latency steps | bytes sent (rank 0) | combine ms "
             "| local partial ms |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["measured"]:
        for name in METHODS:
            r = row[name]
            flag = " (oversubscribed)" if row["oversubscribed"] else ""
            lines.append(f"| {row['P']}{flag} | {name} | {r['collectives']} | {r['hops']} | {r['latency_steps']} | "
                         f"{r['bytes_sent']} | {r['combine_ms']:.3f} | {row['local_partial_ms']:.1f} |")
    for tokens, rows in result["modelled"].items():
        lines += ["", f"Modelled per layer and decoded token, {tokens} cached tokens (bf16 K/V, H100 figures):", "",
                  "| P | tree us | butterfly us | ring (partials) us | ring attention (K/V) us | local us | tree steps "
                  "| ring steps | tree speed-up vs ring | butterfly vs ring | tree vs ring attention |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['P']} | {r['tree_us']:.1f} | {r['butterfly_us']:.1f} | {r['ring_us']:.1f} | "
                         f"{r['ring_attention_us']:.1f} | {r['local_us']:.2f} | {r['tree_latency_steps']} | "
                         f"{r['ring_latency_steps']} | {r['speedup_vs_ring']:.2f}x | "
                         f"{r['butterfly_speedup_vs_ring']:.2f}x | {r['speedup_vs_ring_attention']:.1f}x |")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ps = [r["P"] for r in result["measured"]]
    for name in METHODS:
        ax1.plot(ps, [r[name]["combine_ms"] for r in result["measured"]], "o-", label=f"{name} combine")
        ax1.plot(ps, [r[name]["latency_steps"] for r in result["measured"]], "x--", label=f"{name} latency steps")
    ax1.set(xlabel="P (gloo processes, CPU; >cores oversubscribed)", title="measured per token & layer")
    ax1.legend(fontsize=8)
    for tokens, rows in result["modelled"].items():
        x = [r["P"] for r in rows]
        ax2.plot(x, [r["speedup_vs_ring"] for r in rows], "o-", label=f"vs ring partials, {tokens} tok")
        ax2.plot(x, [r["speedup_vs_ring_attention"] for r in rows], "s--", label=f"vs ring attention, {tokens} tok")
        ax2.plot(x, [r["butterfly_speedup_vs_ring"] for r in rows], "^:", label=f"butterfly vs ring, {tokens} tok")
    ax2.set(xscale="log", yscale="log", xlabel="P (GPUs, 8 per node)", ylabel="modelled tree speed-up",
            title="cost model (H100, NVLink + IB)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
