"""A few training steps of the tiny model at long context on CPU ranks (gloo), striped ring.

Runs ``lctrain.train`` under torchrun and reads each rank's log: tokens/s of the last step and
the peak resident memory of every rank (``getrusage``), with and without the memory knobs
(block checkpointing, the tiled MLP, activation offload).

    python bench/long_context_cpu.py                     # 65536 tokens over 2 ranks, 2 steps
    python bench/long_context_cpu.py --seq-len 131072 --ranks 4
    python bench/long_context_cpu.py --dry-run           # 2048 tokens, output to a temp dir
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from lctrain.benchmarking import add_output_options, output_dir, write_record

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "plain": [],
    "checkpointing + tiled MLP": ["model.activation_checkpointing=true", "model.mlp_tile_tokens=4096"],
    "+ activation offload": ["model.activation_checkpointing=true", "model.mlp_tile_tokens=4096",
                             "model.activation_offload=true"],
}
STEP_LINE = re.compile(r"step (\d+) loss (\S+) .* (\d+) tok/s peak (\S+) GiB")


def run(seq_len: int, ranks: int, steps: int, extra: list[str], work: Path, name: str) -> dict:
    args = [sys.executable, "-m", "lctrain.launch", f"--nproc-per-node={ranks}", "-m", "lctrain.train",
            "model=tiny", "model.num_layers=2", "data=passkey", f"data.seq_len={seq_len}", "cp=striped",
            f"cp.size={ranks}", "kernel=torch", "logger=none", f"trainer.steps={steps}", "trainer.eval_every=0",
            "trainer.eval_samples=1", "trainer.checkpoint_every=0", "trainer.save_final=false",
            "trainer.progress=false", "trainer.num_threads=1", *extra]
    env = {**os.environ, "LCTRAIN_RUN_ID": name}
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    per_rank = []
    for r in range(ranks):
        lines = [STEP_LINE.search(x) for x in (work / "outputs" / name / f"train_rank{r}.log").read_text().splitlines()]
        last = [m for m in lines if m][-1]
        per_rank.append({"tokens_per_s": int(last.group(3)), "peak_rss_gib": float(last.group(4))})
    return {"overrides": extra, "loss": float(last.group(2)), "ranks": per_rank,
            "tokens_per_s": per_rank[0]["tokens_per_s"], "max_peak_rss_gib": max(r["peak_rss_gib"] for r in per_rank)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    add_output_options(parser, "2048 tokens")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seq_len = 2048
    out = output_dir(args, "long_context_cpu", RESULTS)
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for i, (variant, extra) in enumerate(VARIANTS.items()):
            rows[variant] = run(args.seq_len, args.ranks, args.steps, extra, Path(work), f"long{i}")
            r = rows[variant]
            print(f"{variant:>28}: {r['tokens_per_s']:,} tok/s, peak RSS per rank up to {r['max_peak_rss_gib']:.2f} GiB, "
                  f"loss {r['loss']:.3f}")
    record = {"seq_len": args.seq_len, "ranks": args.ranks, "steps": args.steps, "variants": rows}
    print(f"wrote {write_record(out / 'long_context_cpu.json', 'long_context_cpu', record, argv)}")


if __name__ == "__main__":
    main()
