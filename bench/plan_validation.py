"""``lctrain-plan``'s step-time model against measurements: Striped Attention's published speed-ups
over Ring Attention, and real steps of several strategies on gloo CPU ranks of this machine.

1. **Published**: the predicted ratio step(ring, contiguous) / step(ring, striped) for the set-ups
   of the Striped Attention paper (Brandon et al. 2023): up to 1.45x at 256k tokens on 8 A100s and
   1.65x at 786k tokens on 16 TPU v4 chips. Their model sizes are not all restated here:
   ``llama_1b``'s shape stands in (the ratio depends mostly on the attention share of the step).
2. **Measured on gloo**: the CPU preset is calibrated on this machine (one rank's fp32 matmul and
   blockwise-attention throughput, gloo's point-to-point bandwidth and latency between two local
   ranks), then ``lctrain.train`` times steps of the tiny model under ring (contiguous and striped),
   Ulysses, all-gather and tree attention at P = 2 and 4, and the rank order and ratios of the
   predicted step times are set against the measured ones. P ranks share the host's cores, so a
   rank's compute rate is the calibrated one times min(1, cores / P).

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

def _time(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def calibrate_compute() -> dict:
    """fp32 matmul FLOP/s and blockwise attention FLOP/s (forward + backward) of one thread."""
    from lctrain_kernels.mask import Coords, Mask
    from lctrain_kernels.torch_blockwise import blockwise_attention

    torch.set_num_threads(1)
    a, b = torch.randn(2048, 512), torch.randn(512, 1408)
    matmul = 2 * 2048 * 512 * 1408 / _time(lambda: a @ b)
    n, h, d = 2048, 4, 32
    q, k, v = (torch.randn(1, n, h, d, requires_grad=True) for _ in range(3))
    coords = Coords.of_sequence(n, q.device)

    def step():
        out, _ = blockwise_attention(q, k, v, coords, coords, Mask(causal=True))
        out.sum().backward()

    pairs = n * (n + 1) / 2
    attention = pairs * 4 * h * d * 3.5 / _time(step)
    return {"matmul_flops": matmul, "attention_flops": attention}


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

def measure_step(strategy: str, layout: str, ranks: int, seq: int, work: Path, steps: int) -> float:
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
    return seq / (sum(rates) / len(rates))


def gloo_validation(seq: int, steps: int, calib: dict, ranks_list=(2, 4), strategies=STRATEGIES) -> list[dict]:
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for ranks in ranks_list:
            share = min(1.0, cores / ranks)
            cl = load_cluster(["cluster=cpu_gloo", f"cluster.gpus_per_node={ranks}",
                               f"cluster.peak_tflops={calib['matmul_flops'] * share / 1e12}",
                               f"cluster.attention_efficiency={calib['attention_flops'] / calib['matmul_flops']}",
                               f"cluster.nvlink_gbps={calib['bandwidth_Bps'] / 1e9}",
                               f"cluster.nvlink_latency_us={calib['latency_s'] * 1e6}"])
            cfg = compose_object(["model=tiny", "model.num_layers=2", f"data.seq_len={seq}", "trainer.dtype=float32"])
            for strategy, layout in strategies:
                measured = measure_step(strategy, layout, ranks, seq, Path(work), steps)
                c = Candidate(strategy, layout, ranks, 1, "ddp", False, 0, False)
                predicted = predict(c, cfg, cl, check_memory=False).step_s
                rows.append({"ranks": ranks, "strategy": strategy, "layout": layout, "measured_s": measured,
                             "predicted_s": predicted})
                print(f"P={ranks} {strategy}/{layout}: measured {measured:.3f} s, predicted {predicted:.3f} s",
                      flush=True)
    return rows


def _rank_agreement(rows: list[dict]) -> dict:
    """Per P: the measured and predicted orders, and Kendall's tau between them."""
    out = {}
    for ranks in sorted({r["ranks"] for r in rows}):
        sub = [r for r in rows if r["ranks"] == ranks]
        pairs = [(a, b) for i, a in enumerate(sub) for b in sub[i + 1:]]
        agree = sum(1 if (a["measured_s"] - b["measured_s"]) * (a["predicted_s"] - b["predicted_s"]) > 0 else -1
                    for a, b in pairs)
        label = [f"{r['strategy']}/{r['layout']}" for r in sub]
        out[str(ranks)] = {"kendall_tau": agree / len(pairs),
                           "measured_order": [label[i] for i in sorted(range(len(sub)), key=lambda i: sub[i]["measured_s"])],
                           "predicted_order": [label[i] for i in sorted(range(len(sub)),
                                                                        key=lambda i: sub[i]["predicted_s"])]}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    add_output_options(parser, "1024 tokens, 2 steps, two strategies at P = 2")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seq_len, args.steps = 1024, 2
    out = output_dir(args, "plan_validation", RESULTS)
    published = published_ratios()
    for r in published:
        print(f"striped over ring, {r['setup']}: predicted x{r['predicted']:.2f}, published x{r['published']:.2f} "
              f"(ratio {r['predicted_over_published']:.2f})")
    calib = {**calibrate_compute(), **calibrate_gloo()}
    print(f"calibration: matmul {calib['matmul_flops'] / 1e9:.1f} GFLOP/s, attention {calib['attention_flops'] / 1e9:.1f}"
          f" GFLOP/s, gloo {calib['bandwidth_Bps'] / 1e9:.2f} GB/s, {calib['latency_s'] * 1e6:.0f} us")
    rows = (gloo_validation(args.seq_len, args.steps, calib, (2,), STRATEGIES[:2]) if args.dry_run
            else gloo_validation(args.seq_len, args.steps, calib))
    agreement = _rank_agreement(rows)
    for ranks, a in agreement.items():
        print(f"P={ranks}: Kendall tau {a['kendall_tau']:.2f}; measured {a['measured_order']}; predicted "
              f"{a['predicted_order']}")
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
        ax.bar([x - 0.2 for x in xs], [r["measured_s"] for r in sub], width=0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [r["predicted_s"] for r in sub], width=0.4, label="predicted")
        ax.set_xticks(list(xs), [f"{r['strategy']}\n{r['layout']}" for r in sub], fontsize=7)
        ax.set(ylabel="step time (s)", title=f"tiny model, {args.seq_len} tokens, P={ranks} gloo ranks")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plan_validation.png", dpi=110)
    print(f"wrote {out / 'plan_validation.png'}")


if __name__ == "__main__":
    main()
