"""Tree vs ring combination of sharded-KV-cache attention for one decoded token.

Measured (CPU, gloo, P = 2..8 processes): every rank holds a shard of a
``--total-tokens`` KV cache (default 64k tokens, h_kv = 8, head_dim = 128,
32 query heads, fp32), computes the partial attention of one new query against
it (``local_partial``, i.e. ``blockwise_forward`` with coordinates) and the
partials are combined with ``tree_combine`` (all-reduce MAX + all-reduce SUM)
or ``butterfly_combine`` (log2 P P2P swap-and-merge rounds: the tree written
out in P2P, since gloo's all-reduce is itself a ring) or ``ring_combine``
(P - 1 sequential merges + broadcast), exactly as
``lctrain.generate`` does per layer. Reported per decoded token and layer:
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
Bandwidths from DESIGN.md §7 (NVLink 450 GB/s per direction, IB ~50 GB/s per
GPU, HBM3 3.35 TB/s); the latencies are stated assumptions (flags).

Run:  .venv/bin/python bench/tree_decode.py        (~1-2 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lctrain.generate_combine import (  # noqa: E402
    Comm, DecodeCounters, butterfly_combine, local_partial, ring_combine, tree_combine)

METHODS = {"tree": tree_combine, "butterfly": butterfly_combine, "ring": ring_combine}


# ----------------------------------------------------------------- measured
def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        group = dist.group.WORLD
        gen = torch.Generator().manual_seed(rank)
        shard = args.total_tokens // world
        k, v = (torch.randn(1, shard, args.kv_heads, args.head_dim, generator=gen) for _ in range(2))
        k_pos = torch.arange(rank, args.total_tokens, world)  # striped shard
        k_doc = torch.zeros_like(k_pos)
        q_pos, q_doc = torch.tensor([[args.total_tokens]]), torch.tensor([[0]])
        times = {"local": [], **{name: [] for name in METHODS}}
        counts = {}
        for step in range(args.warmup + args.steps):
            q = torch.randn(1, 1, args.heads, args.head_dim, generator=torch.Generator().manual_seed(10_000 + step))
            dist.barrier()
            start = time.perf_counter()
            out, lse = local_partial(q, k, v, q_pos, q_doc, k_pos, k_doc)
            elapsed = {"local": time.perf_counter() - start}
            for name, combine in METHODS.items():
                comm = Comm(group, DecodeCounters())
                dist.barrier()
                start = time.perf_counter()
                combine(out, lse, comm)
                elapsed[name] = time.perf_counter() - start
                counts[name] = {"collectives": comm.counters.collectives, "hops": comm.counters.hops,
                                "latency_steps": comm.counters.latency_steps,
                                "bytes_sent": comm.counters.bytes_sent}
            if step >= args.warmup:
                for name, seconds in elapsed.items():
                    times[name].append(seconds)
        queue.put((rank, "ok", {"times": times, "counts": counts}))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(world: int, args) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, status, value = queue.get(timeout=600)
        if status != "ok":
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        results[rank] = value
    for p in procs:
        p.join(timeout=30)
    ranks = [results[r] for r in range(world)]
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
def main(argv=None) -> dict:
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
    p.add_argument("--out", default="bench/results/tree_decode.json", help="relative to the repository root")
    args = p.parse_args(argv)

    start = time.perf_counter()
    measured = [measure(int(x), args) for x in args.ps.split(",")]
    net = {"alpha_nvl": args.alpha_nvl_us * 1e-6, "bw_nvl": 450e9, "alpha_ib": args.alpha_ib_us * 1e-6,
           "bw_ib": 50e9, "hbm_bw": 3.35e12, "kernel": args.kernel_us * 1e-6, "per_node": 8}
    shape = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "kv_bytes": 2}
    model = {int(n): [cost_model(int(w), int(n), net, shape) for w in args.model_ps.split(",")]
             for n in args.model_tokens.split(",")}
    sensitivity = {f"alpha_ib_us={a}": {w: cost_model(w, int(args.model_tokens.split(",")[0]),
                                                       {**net, "alpha_ib": a * 1e-6}, shape)["speedup_vs_ring"]
                                        for w in (64, 512)} for a in (2.0, 5.0, 10.0)}
    sensitivity.update({f"kernel_us={k}": {w: cost_model(w, int(args.model_tokens.split(",")[0]),
                                                         {**net, "kernel": k * 1e-6}, shape)["speedup_vs_ring"]
                                           for w in (64, 512)} for k in (0.0, 3.0)})
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "backend": "gloo"},
        "note": "P processes on os.cpu_count() cores: P > cores is oversubscribed, wall times are then "
                "dominated by scheduling; counts and bytes are exact per rank (rank 0 shown).",
        "measured": measured, "network_model": {**net, "source": "bandwidths: DESIGN.md §7; latencies and "
                                                "kernel launch: assumptions (see flags)"},
        "model_shape": shape, "modelled": model, "sensitivity_speedup_vs_ring_64k": sensitivity,
        "wall_s": time.perf_counter() - start,
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    _plot(result, out.with_suffix(".png"))
    return result


def markdown(result: dict) -> str:
    cores = result["device"]["cores"]
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: skipped {path} (pip install -e '.[bench]')")
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
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
