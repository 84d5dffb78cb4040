"""``lctrain-plan``'s step-time model against measurements: Striped Attention's published speed-ups
over Ring Attention, and real steps of several strategies on gloo CPU ranks of this machine.

1. **Published**: the predicted ratio step(ring, contiguous) / step(ring, striped) for the set-ups
   of the Striped Attention paper (Brandon et al. 2023): up to 1.45x at 256k tokens on 8 A100s and
   1.65x at 786k tokens on 16 TPU v4 chips. Their model sizes are not all restated here:
   ``llama_1b``'s shape stands in (the ratio depends mostly on the attention share of the step).
2. **Measured on gloo**: the CPU preset is calibrated on this machine (one rank's fp32 matmul
   throughput; the blockwise attention kernel's cost per head-tile, per tile and per call, and a
   partly masked tile's cost over a full one's; gloo's point-to-point bandwidth and latency
   between two local ranks), then ``lctrain.train`` times steps of the tiny model under ring
   (contiguous and striped), Ulysses, all-gather and tree attention at P = 2 and 4, and the rank
   order and ratios of the predicted step times are set against the measured ones. With more
   ranks than cores the plan's shared-core rule applies (``cluster.cores_per_node``).

    python bench/plan_validation.py              # ~10 min on 2 cores; run it alone (timing)
    python bench/plan_validation.py --dry-run    # short sequences, output to a temp dir
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lctrain.benchmarking import add_output_options, output_dir, pyplot, write_record
from lctrain.config import compose_object
from lctrain.plan.cluster import load_cluster
from lctrain.plan.cost import Candidate, predict

RESULTS = Path(__file__).resolve().parent / "results"
PUBLISHED = [("8 x A100, 256k tokens", ["cluster=a100"], 262144, 1.45),
             ("16 x TPU v4, 786k tokens", ["cluster=tpuv4", "cluster.nodes=4"], 786432, 1.65)]
STRATEGIES = [("ring", "contiguous"), ("ring", "striped"), ("ulysses", "contiguous"), ("allgather", "striped"),
              ("tree", "striped")]
STEP_LINE = re.compile(r"step (\d+) loss \S+ lr \S+ grad_norm \S+ (\d+) tok/s")


def published_ratios() -> list[dict]:
    rows = []
    for name, cluster, seq, published in PUBLISHED:
        cl = load_cluster(cluster)
        cfg = compose_object(["model=llama_1b", f"data.seq_len={seq}"])
        times = {}
        for layout in ("contiguous", "striped"):
            c = Candidate("ring", layout, cl.world, 1, "fsdp2", True, 0, False)
            times[layout] = predict(c, cfg, cl, check_memory=False).step_s
        ratio = times["contiguous"] / times["striped"]
        rows.append({"setup": name, "seq_len": seq, "gpus": cl.world, "predicted": ratio, "published": published,
                     "predicted_over_published": ratio / published})
    return rows


# ----------------------------------------------------------------------------- calibration

def _time(fn, repeat: int = 5) -> float:
    """Median seconds of ``fn`` after a warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def calibrate_compute(heads: int = 4, head_dim: int = 32) -> dict:
    """One thread's fp32 matmul FLOP/s; the blockwise kernel's FLOP/s on full tiles (a full
    block, forward + backward) and a partly masked tile's cost over a full one's (a causal block
    against the full one: the same tiles below the diagonal, the diagonal's partial)."""
    from lctrain_kernels.mask import Coords, Mask
    from lctrain_kernels.torch_blockwise import DEFAULT_BLOCK_Q, blockwise_attention

    torch.set_num_threads(1)
    a, b = torch.randn(2048, 512), torch.randn(512, 1408)
    matmul = 2 * 2048 * 512 * 1408 / _time(lambda: a @ b)
    side = 16
    n = side * DEFAULT_BLOCK_Q
    coords = Coords.of_sequence(n, torch.device("cpu"))

    def call(causal: bool, h: int = heads) -> float:
        q, k, v = (torch.randn(1, n, h, head_dim, requires_grad=True) for _ in range(3))

        def step():
            out, _ = blockwise_attention(q, k, v, coords, coords, Mask(causal=causal))
            out.sum().backward()
        return _time(step)

    # per full tile, forward + backward: a fixed cost (dispatch) plus one per head (a Ulysses
    # rank runs the same tiles with heads / P heads)
    per_tile, per_tile_one_head = call(False) / side**2, call(False, 1) / side**2
    per_head = (per_tile - per_tile_one_head) / (heads - 1)
    fixed = max(0.0, per_tile_one_head - per_head)
    per_partial = (call(True) - side * (side - 1) // 2 * per_tile) / side
    attention = DEFAULT_BLOCK_Q**2 * 4 * head_dim * 3.5 / per_head
    return {"matmul_flops": matmul, "attention_flops": attention, "tile_overhead_s": fixed / 2,
            "partial_tile_cost": (per_partial - fixed) / (per_tile - fixed)}


def calibrate(cores: int, rounds: int = 3) -> dict:
    """Kernel rates alone and with every core busy, interleaved ``rounds`` times (the median of
    each figure: this machine's speed drifts between minutes)."""
    runs = {"alone": [], "loaded": []}
    for _ in range(rounds):
        runs["alone"].append(calibrate_compute())
        runs["loaded"].append(calibrate_compute_loaded(cores))
    return {name: {key: float(np.median([r[key] for r in rs])) for key in rs[0]} for name, rs in runs.items()}


def _calibrate_worker(queue) -> None:
    queue.put(calibrate_compute())


def calibrate_compute_loaded(processes: int) -> dict:
    """``calibrate_compute`` in ``processes`` processes at once, averaged: a rank's rates while
    every core is busy (shared memory bandwidth and caches), as in the measured runs."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_calibrate_worker, args=(queue,)) for _ in range(processes)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {key: sum(r[key] for r in results) / len(results) for key in results[0]}


def _pingpong(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for nbytes in (8, 4 << 20):
        x = torch.zeros(nbytes // 4)
        for _ in range(3):  # warm up
            dist.send(x, 1) if rank == 0 else dist.recv(x, 0)
            dist.recv(x, 1) if rank == 0 else dist.send(x, 0)
        start, reps = time.perf_counter(), 20
        for _ in range(reps):
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(x, 0)
                dist.send(x, 0)
        out[nbytes] = (time.perf_counter() - start) / (2 * reps)  # one way
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def calibrate_gloo() -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pingpong, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    times = queue.get(timeout=120)
    for p in procs:
        p.join()
    latency = times[8]
    bandwidth = (4 << 20) / max(times[4 << 20] - latency, 1e-9)
    return {"latency_s": latency, "bandwidth_Bps": bandwidth}


# ----------------------------------------------------------------------------- measured steps

def measure_steps(strategy: str, layout: str, ranks: int, seq: int, work: Path, steps: int) -> list[float]:
    """Seconds of each step after the first of one ``lctrain.train`` run."""
    name = f"{strategy}_{layout}_{ranks}"
    args = [sys.executable, "-m", "lctrain.launch", f"--nproc-per-node={ranks}", "-m", "lctrain.train",
            "model=tiny", "model.num_layers=2", f"data.seq_len={seq}", f"cp={strategy}", f"cp.size={ranks}",
            f"cp.layout={layout}", "kernel=torch", "logger=none", f"trainer.steps={steps}", "trainer.eval_samples=1",
            "trainer.checkpoint_every=0", "trainer.save_final=false", "trainer.progress=false",
            "trainer.num_threads=1"]
    env = {**os.environ, "LCTRAIN_RUN_ID": name, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    lines = (work / "outputs" / name / "train_rank0.log").read_text().splitlines()
    rates = [int(m.group(2)) for m in map(STEP_LINE.search, lines) if m]
    rates = rates[1:] or rates  # the first step warms up
    return [seq / rate for rate in rates]


def cpu_cluster(calib: dict, ranks: int, cores: int) -> list[str]:
    """The cpu_gloo overrides for ``ranks`` ranks: the kernel's rates with every core busy, scaled
    by the trainer's measured overhead factor; its speed-up when a rank computes alone; gloo."""
    loaded, alone, factor = calib["loaded"], calib["alone"], calib["trainer_factor"]
    return ["cluster=cpu_gloo", f"cluster.gpus_per_node={ranks}", f"cluster.cores_per_node={cores}",
            f"cluster.peak_tflops={loaded['matmul_flops'] / factor / 1e12}",
            f"cluster.attention_efficiency={loaded['attention_flops'] / loaded['matmul_flops']}",
            f"cluster.partial_tile_cost={loaded['partial_tile_cost']}",
            f"cluster.tile_overhead_us={loaded['tile_overhead_s'] * factor * 1e6}",
            f"cluster.alone_speedup={alone['attention_flops'] / loaded['attention_flops']}",
            f"cluster.nvlink_gbps={calib['bandwidth_Bps'] / 1e9}",
            f"cluster.nvlink_latency_us={calib['latency_s'] * 1e6}"]


def _tiny(seq: int):
    return compose_object(["model=tiny", "model.num_layers=2", f"data.seq_len={seq}", "trainer.dtype=float32"])


def trainer_factor(seq: int, steps: int, calib: dict, work: Path) -> float:
    """Measured over predicted step time of one rank alone (cp=none) at ``seq`` tokens with the
    kernel's rates alone: what a real step adds to the calibrated kernels (autograd, layout
    transposes, the loss, the optimizer). Measured on the single-device path, not on any of the
    validated strategies."""
    measured = float(np.median(measure_steps("none", "contiguous", 1, seq, work, steps)))
    alone = {**calib, "loaded": calib["alone"], "trainer_factor": 1.0}
    cl = load_cluster(cpu_cluster(alone, 1, os.cpu_count() or 1))
    predicted = predict(Candidate("none", "contiguous", 1, 1, "ddp", False, 0, False), _tiny(seq), cl,
                        check_memory=False).step_s
    print(f"one rank alone, {seq} tokens: measured {measured:.3f} s, kernels predict {predicted:.3f} s", flush=True)
    return measured / predicted


def gloo_validation(seq: int, steps: int, calib: dict, work: Path, ranks_list=(2, 4), strategies=STRATEGIES,
                    reuse: dict | None = None, rounds: int = 2) -> list[dict]:
    """Measured and predicted step times. Every point is measured in each of ``rounds``
    interleaved rounds: its step time is the median of all its steps, its spread the range of
    the rounds' medians (this machine's speed drifts). ``reuse`` maps (ranks, strategy, layout)
    to a row measured before (a re-prediction with a new calibration or model)."""
    cores = os.cpu_count() or 1
    points = [(ranks, strategy, layout) for ranks in ranks_list for strategy, layout in strategies]
    runs = {p: [] for p in points}
    for _ in range(rounds):
        for point in points:
            if not (reuse and point in reuse):
                runs[point].append(measure_steps(point[1], point[2], point[0], seq, work, steps))
    rows = []
    for point in points:
        ranks, strategy, layout = point
        if reuse and point in reuse:
            measured, low, high = (reuse[point][k] for k in ("measured_s", "measured_low_s", "measured_high_s"))
        else:
            medians = [float(np.median(r)) for r in runs[point]]
            measured, low, high = float(np.median(sum(runs[point], []))), min(medians), max(medians)
        cl = load_cluster(cpu_cluster(calib, ranks, cores))
        c = Candidate(strategy, layout, ranks, 1, "ddp", False, 0, False)
        predicted = predict(c, _tiny(seq), cl, check_memory=False).step_s
        rows.append({"ranks": ranks, "strategy": strategy, "layout": layout, "measured_s": measured,
                     "measured_low_s": low, "measured_high_s": high, "predicted_s": predicted})
        print(f"P={ranks} {strategy}/{layout}: measured {measured:.3f} s (rounds {low:.3f}-{high:.3f}), "
              f"predicted {predicted:.3f} s", flush=True)
    return rows


def _rank_agreement(rows: list[dict]) -> dict:
    """Per P: the measured and predicted orders, and Kendall's tau between them."""
    out = {}
    for ranks in sorted({r["ranks"] for r in rows}):
        sub = [r for r in rows if r["ranks"] == ranks]
        pairs = [(a, b) for i, a in enumerate(sub) for b in sub[i + 1:]]
        agree = sum(1 if (a["measured_s"] - b["measured_s"]) * (a["predicted_s"] - b["predicted_s"]) > 0 else -1
                    for a, b in pairs)
        # a pair is resolved when its rounds' ranges do not overlap: the machine ranks it the same
        # way every round
        resolved = [(a, b) for a, b in pairs
                    if a["measured_low_s"] > b["measured_high_s"] or b["measured_low_s"] > a["measured_high_s"]]
        agree_resolved = sum(1 if (a["measured_s"] - b["measured_s"]) * (a["predicted_s"] - b["predicted_s"]) > 0
                             else 0 for a, b in resolved)
        label = [f"{r['strategy']}/{r['layout']}" for r in sub]
        ref = next((r for r in sub if (r["strategy"], r["layout"]) == ("ring", "striped")), sub[0])
        ratios = {f"{r['strategy']}/{r['layout']}": {"measured": r["measured_s"] / ref["measured_s"],
                                                     "predicted": r["predicted_s"] / ref["predicted_s"]} for r in sub}
        out[str(ranks)] = {"kendall_tau": agree / len(pairs), "over_ring_striped": ratios,
                           "resolved_pairs": len(resolved), "resolved_pairs_in_order": agree_resolved,
                           "pairs": len(pairs),
                           "measured_order": [label[i] for i in sorted(range(len(sub)), key=lambda i: sub[i]["measured_s"])],
                           "predicted_order": [label[i] for i in sorted(range(len(sub)),
                                                                        key=lambda i: sub[i]["predicted_s"])]}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved measurements of every point")
    parser.add_argument("--reuse-measured", type=Path, default=None,
                        help="a plan_validation.json whose measured step times to reuse (re-predict only)")
    add_output_options(parser, "1024 tokens, 2 steps, two strategies at P = 2")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seq_len, args.steps = 1024, 2
    out = output_dir(args, "plan_validation", RESULTS)
    published = published_ratios()
    for r in published:
        print(f"striped over ring, {r['setup']}: predicted x{r['predicted']:.2f}, published x{r['published']:.2f} "
              f"(ratio {r['predicted_over_published']:.2f})")
    cores = os.cpu_count() or 1
    calib = {**calibrate(cores, rounds=1 if args.dry_run else 3), **calibrate_gloo()}
    for name in ("alone", "loaded"):
        c = calib[name]
        print(f"calibration ({name}): matmul {c['matmul_flops'] / 1e9:.1f} GFLOP/s, attention "
              f"{c['attention_flops'] / 1e9:.1f} GFLOP/s, partial tile x{c['partial_tile_cost']:.2f}, "
              f"{c['tile_overhead_s'] * 1e6:.0f} us fixed per tile visit")
    print(f"gloo {calib['bandwidth_Bps'] / 1e9:.2f} GB/s, {calib['latency_s'] * 1e6:.0f} us")
    reuse = None
    if args.reuse_measured:
        import json

        old = json.loads(args.reuse_measured.read_text())
        if old["seq_len"] != args.seq_len:
            raise ValueError(f"{args.reuse_measured} measured {old['seq_len']} tokens, not --seq-len {args.seq_len}")
        reuse = {(r["ranks"], r["strategy"], r["layout"]): r for r in old["gloo"] if "measured_low_s" in r}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib["trainer_factor"] = trainer_factor(args.seq_len // 2, args.steps, calib, work)
        print(f"trainer factor x{calib['trainer_factor']:.2f}")
        rows = (gloo_validation(args.seq_len, args.steps, calib, work, (2,), STRATEGIES[:2], reuse, 1) if args.dry_run
                else gloo_validation(args.seq_len, args.steps, calib, work, reuse=reuse, rounds=args.rounds))
    agreement = _rank_agreement(rows)
    for ranks, a in agreement.items():
        print(f"P={ranks}: Kendall tau {a['kendall_tau']:.2f}; {a['resolved_pairs_in_order']} of the "
              f"{a['resolved_pairs']} pairs the rounds agree on (of {a['pairs']}) predicted in order; measured "
              f"{a['measured_order']}; predicted {a['predicted_order']}")
        print("  over ring/striped, measured / predicted: " + ", ".join(
            f"{name} {x['measured']:.2f} / {x['predicted']:.2f}" for name, x in a["over_ring_striped"].items()))
    record = {"published": published, "calibration": calib, "gloo": rows, "agreement": agreement,
              "seq_len": args.seq_len, "cores": os.cpu_count()}
    print(f"wrote {write_record(out / 'plan_validation.json', 'plan_validation', record, argv)}")
    plt = pyplot(out / "plan_validation.png")
    if plt is None:
        return
    ranks_run = sorted({r["ranks"] for r in rows})
    fig, axes = plt.subplots(1, len(ranks_run), figsize=(5.5 * len(ranks_run), 4), squeeze=False)
    for ax, ranks in zip(axes[0], ranks_run):
        sub = [r for r in rows if r["ranks"] == ranks]
        xs = range(len(sub))
        err = [[r["measured_s"] - r["measured_low_s"] for r in sub], [r["measured_high_s"] - r["measured_s"] for r in sub]]
        ax.bar([x - 0.2 for x in xs], [r["measured_s"] for r in sub], width=0.4, yerr=err, capsize=3,
               label="measured (bars: range of the rounds)")
        ax.bar([x + 0.2 for x in xs], [r["predicted_s"] for r in sub], width=0.4, label="predicted")
        ax.set_xticks(list(xs), [f"{r['strategy']}\n{r['layout']}" for r in sub], fontsize=7)
        ax.set(ylabel="step time (s)", title=f"tiny model, {args.seq_len} tokens, P={ranks} gloo ranks")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plan_validation.png", dpi=110)
    print(f"wrote {out / 'plan_validation.png'}")


if __name__ == "__main__":
    main()
