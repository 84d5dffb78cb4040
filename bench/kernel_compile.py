"""What the Triton attention kernels compile to on a GPU target, measured without a GPU.

Compiles the forward, dK/dV and dQ kernels for every autotune configuration, bf16, head dims 64
and 128 (32/d query heads per 2048 hidden, GQA 4:1), causal, for sm_90 (H100) and sm_80 (A100),
and records for each: pipelined asynchronous copies, wgmma count, registers per thread, spill
stores in the SASS and shared memory (see ``lctrain_kernels.triton.inspection``). These are static
facts about the generated code, not timings: a config that spills or is not pipelined cannot be
fast, and the autotuner wastes time trying it. Timings come from ``bench/kernels.py`` on a GPU.

    python bench/kernel_compile.py            # bench/results/kernel_compile.{json,png}
    python bench/kernel_compile.py --archs 90 --dims 128
    python bench/kernel_compile.py --dry-run  # sm_90, d 64, each kernel's first config, files to a temp dir
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lctrain.benchmarking import add_output_options, output_dir, pyplot, write_record

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN = 2048


def _compile_one(job):
    from lctrain_kernels.triton.inspection import captured_calls, compile_stats

    kernel, dim, arch, config = job
    calls = captured_calls(heads=HIDDEN // dim, kv_heads=HIDDEN // dim // 4, head_dim=dim)
    start = time.time()
    stats = compile_stats(calls[kernel], config, arch)
    return {**stats, "name": kernel, "head_dim": dim, "compile_s": round(time.time() - start, 2)}


def plot(rows, path: Path):
    plt = pyplot(path)
    if plt is None:
        return

    sel = [r for r in rows if r["arch"] == "sm_90"]
    dims = sorted({r["head_dim"] for r in sel})
    fig, axes = plt.subplots(1, len(dims), figsize=(7 * len(dims), 4), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        part = [r for r in sel if r["head_dim"] == dim]
        labels = [f"{r['name']} {r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']}" for r in part]
        x = range(len(part))
        ax.bar([i - 0.2 for i in x], [r["registers"] for r in part], width=0.4, label="registers / thread")
        ax.bar([i + 0.2 for i in x], [r["spill_stores"] for r in part], width=0.4, label="spill stores (SASS)")
        ax.axhline(255, color="grey", lw=0.8, ls="--")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
        ax.set_title(f"sm_90, bf16, d={dim}, causal: every autotune config")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compile_jobs(archs, dims, first_only: bool) -> list[tuple]:
    """(kernel, head dim, arch, config) for every autotune config (or each kernel's first)."""
    from lctrain_kernels.triton.launch import DKDV_CONFIGS, DQ_CONFIGS, FWD_CONFIGS

    configs = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}
    return [(kernel, dim, arch, tuple(cfg)) for arch in archs for dim in dims
            for kernel, cfgs in configs.items() for cfg in (cfgs[:1] if first_only else cfgs)]


def print_rows(rows) -> None:
    print(f"{'kernel':6s} {'arch':6s} {'d':>4s} {'config':>16s} {'async':>6s} {'wgmma':>6s} {'regs':>5s} "
          f"{'spills':>6s} {'smem KiB':>8s}")
    for r in rows:
        cfg = f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']}"
        print(f"{r['name']:6s} {r['arch']:6s} {r['head_dim']:4d} {cfg:>16s} {r['async_copies']:6d} {r['wgmma']:6d} "
              f"{r['registers']:5d} {r['spill_stores']:6d} {r['shared_bytes'] / 1024:8.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--workers", type=int, default=2)
    add_output_options(parser, "sm_90, d 64, the first autotune config of each kernel")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.archs, args.dims = [90], [64]
    out = output_dir(args, "kernel_compile", RESULTS)

    start = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(_compile_one, compile_jobs(args.archs, args.dims, first_only=args.dry_run)))
    print_rows(rows)
    wall = round(time.time() - start, 1)
    path = write_record(out / "kernel_compile.json", "kernel_compile", {
        "device": "none (ahead-of-time compilation for the listed GPU targets)",
        "dtype": "bfloat16", "hidden": HIDDEN, "gqa": "4:1", "causal": True, "wall_s": wall, "results": rows},
        argv, extra_modules=("triton",))
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} in {wall} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
