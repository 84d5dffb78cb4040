"""How much attention-server traffic ping-pong hides, measured on CPU gloo ranks.

Trains the tiny Llama with cp=disagg for a few steps with disagg.ping_pong on
and off, colocated (every rank serves) and dedicated (the last rank only serves),
and reads the runtime's timers on the workers: blocked forward time =
``wait_forward_s`` (payload/result all-to-alls) + ``control_forward_s`` (the
control all-gather, where a worker waits for a server still busy with the other
half), i.e. transfers plus waiting for the servers' compute.
Hidden fraction = 1 - blocked(ping-pong) / blocked(sync).
Backward exchanges stay synchronous in both runs (reported apart). On 2 CPU
cores the ranks contend for cores, so read the figures as indicative.

Run:  .venv/bin/python bench/disagg_pingpong.py [--steps 6 --seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dist_utils import run_ranks  # noqa: E402

TIMERS = ("wait_forward_s", "control_forward_s", "wait_backward_s", "control_backward_s", "server_forward_s",
          "server_backward_s")


def _rank(rank, world, args):
    from lctrain.config import compose_config
    from lctrain.distributed import init_distributed
    from lctrain.trainer import Trainer

    env = init_distributed("cpu")
    out = {}
    for mode in ("colocated", "dedicated"):
        for ping_pong in (False, True):
            cfg = compose_config([
                "cp=disagg", f"disagg.mode={mode}", f"disagg.ping_pong={str(ping_pong).lower()}",
                f"data.seq_len={args['seq_len']}", "data.docs_per_seq=4", "trainer.dtype=float32",
                "trainer.num_threads=1", "trainer.progress=false", f"trainer.steps={args['steps'] + 2}",
                "trainer.eval_samples=1"])
            t = Trainer(cfg, env, Path(args["tmp"]) / f"{mode}-{ping_pong}")
            if t.is_attention_server:
                t.fit()
                continue
            for _ in range(2):  # warm-up
                t.train_step()
            t.disagg.runtime.timers.clear()
            start = time.perf_counter()
            for _ in range(args["steps"]):
                t.train_step()
            timers = dict(t.disagg.runtime.timers)
            out[f"{mode}/ping_pong={ping_pong}"] = {"step_s": (time.perf_counter() - start) / args["steps"],
                                                     **{k: timers.get(k, 0.0) / args["steps"] for k in TIMERS}}
            t.stop_attention_servers()
            t.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "disagg_pingpong.json"))
    args = parser.parse_args()
    tmp = ROOT / "outputs" / "bench_disagg_pingpong"
    per_rank = run_ranks(_rank, args.world, {"steps": args.steps, "seq_len": args.seq_len, "tmp": str(tmp)},
                         timeout=1800)
    summary = {}
    for mode in ("colocated", "dedicated"):
        workers = [r for r in per_rank if f"{mode}/ping_pong=True" in r]
        mean = {pp: {k: sum(r[f"{mode}/ping_pong={pp}"][k] for r in workers) / len(workers)
                     for k in ("step_s",) + TIMERS} for pp in (False, True)}
        for pp in (False, True):
            mean[pp]["blocked_forward_s"] = mean[pp]["wait_forward_s"] + mean[pp]["control_forward_s"]
        hidden = 1 - mean[True]["blocked_forward_s"] / max(mean[False]["blocked_forward_s"], 1e-12)
        summary[mode] = {"sync": mean[False], "ping_pong": mean[True], "forward_wait_hidden_fraction": hidden}
        print(f"{mode:10s} forward blocked per step: sync {mean[False]['blocked_forward_s'] * 1e3:7.1f} ms, "
              f"ping-pong {mean[True]['blocked_forward_s'] * 1e3:7.1f} ms -> {100 * hidden:5.1f}% hidden | "
              f"step {mean[False]['step_s']:.3f} s -> {mean[True]['step_s']:.3f} s | backward blocked "
              f"{(mean[True]['wait_backward_s'] + mean[True]['control_backward_s']) * 1e3:.1f} ms (synchronous)")
    result = {"device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
              "torch": torch.__version__, "command": " ".join(sys.argv), "world": args.world,
              "steps": args.steps, "seq_len": args.seq_len, "summary": summary, "per_rank": per_rank}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
