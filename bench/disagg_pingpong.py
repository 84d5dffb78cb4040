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

Run:  python bench/disagg_pingpong.py [--steps 6 --seq-len 2048]   (--dry-run: 1 step, 512 tokens, temp dir)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from lctrain.benchmarking import add_output_options, output_dir, write_record
from lctrain.distributed.spawn import run_ranks

RESULTS = Path(__file__).resolve().parent / "results"
TIMERS = ("wait_forward_s", "control_forward_s", "wait_backward_s", "control_backward_s", "server_forward_s",
          "server_backward_s")
MODES = ("colocated", "dedicated")
WARMUP_STEPS = 2


def _overrides(mode: str, ping_pong: bool, args: dict) -> list[str]:
    return ["cp=disagg", f"disagg.mode={mode}", f"disagg.ping_pong={str(ping_pong).lower()}",
            f"data.seq_len={args['seq_len']}", "data.docs_per_seq=4", "trainer.dtype=float32",
            "trainer.num_threads=1", "trainer.progress=false", f"trainer.steps={args['steps'] + WARMUP_STEPS}",
            "trainer.eval_samples=1", f"disagg.timeout_s={args['timeout_s']}"]


def _timed_steps(trainer, steps: int) -> dict:
    """Mean step time and runtime timers per step, after the warm-up steps."""
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    timers = trainer.attention.runtime.timers
    timers.clear()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return {"step_s": (time.perf_counter() - start) / steps, **{k: timers.get(k, 0.0) / steps for k in TIMERS}}


def _rank(rank, world, args):
    from lctrain.config import compose_config
    from lctrain.distributed import init_distributed
    from lctrain.trainer import build_rank

    env = init_distributed("cpu")
    out = {}
    for mode in MODES:
        for ping_pong in (False, True):
            cfg = compose_config(_overrides(mode, ping_pong, args))
            worker = build_rank(cfg, env, Path(args["tmp"]) / f"{mode}-{ping_pong}")
            if not worker.holds_model:  # a dedicated server: serves until the workers finish
                worker.fit()
            else:
                out[f"{mode}/ping_pong={ping_pong}"] = _timed_steps(worker, args["steps"])
                worker.attention.finish()  # release the servers
            worker.close()
    return out


def summarise(per_rank: list[dict]) -> dict:
    """Per mode: the workers' mean timers with ping-pong off and on, and the hidden fraction."""
    summary = {}
    for mode in MODES:
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
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=2048)
    add_output_options(parser, "1 timed step of 512 tokens")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="disagg.timeout_s: a stalled peer fails then")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.steps, args.seq_len, args.timeout_s = 1, 512, 60.0  # 4 passkey documents need >= 424 tokens
    out = output_dir(args, "disagg_pingpong", RESULTS)
    with tempfile.TemporaryDirectory(prefix="disagg_pingpong-runs-") as runs:
        settings = {"steps": args.steps, "seq_len": args.seq_len, "timeout_s": args.timeout_s, "tmp": runs}
        per_rank = run_ranks(_rank, args.world, settings, timeout=1800)
    summary = summarise(per_rank)
    path = write_record(out / "disagg_pingpong.json", "disagg_pingpong", {
        "world": args.world, "steps": args.steps, "seq_len": args.seq_len, "summary": summary,
        "per_rank": per_rank}, argv, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
