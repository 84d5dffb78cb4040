"""The compiled (GPU) path of the Triton kernels and the tile plan kernel, checked without a GPU.

The interpreter tests run the kernels' arithmetic but never Triton's compiler, so a kernel that
only breaks when compiled (a type error in a constexpr branch, a layout the backend rejects)
would pass them. Here every kernel is compiled ahead of time for sm_90 (H100) and sm_80 (A100)
across its constexpr variants, and the generated code is checked for what speed needs: tile
loads pipelined into asynchronous copies, Hopper's wgmma on sm_90, no register spills in the
configs listed below. Compilation needs no GPU, only triton's bundled ptxas. One subprocess, so
that TRITON_INTERPRET (which other kernel tests set) cannot leak in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("triton")

# (name, dtype, head_dim, causal, window): every constexpr branch compiles at least once.
VARIANTS = [("bf16_d128_causal", "bfloat16", 128, True, None),
            ("fp16_d96_window", "float16", 96, False, 64),
            ("fp32_d64_causal_window", "float32", 64, True, 128),
            ("bf16_d256_causal", "bfloat16", 256, True, None)]
# Configs whose code must be spill-free on sm_90 for bf16 d=128 (one per kernel).
SPILL_FREE = {"fwd": (128, 64, 8, 3), "dkdv": (16, 64, 8, 2), "dq": (128, 32, 8, 2)}
SMALL = (64, 32, 4, 2)  # the fallback config: fits every head dim


def _compile(job):
    import torch

    from lctrain_kernels.triton.inspection import captured_calls, compile_stats

    name, dtype, dim, causal, window, kernel, config, arch = job
    calls = captured_calls(getattr(torch, dtype), seq=512, heads=16, kv_heads=4, head_dim=dim,
                           causal=causal, window=window)
    try:
        return {"variant": name, **compile_stats(calls[kernel], config, arch)}
    except Exception as err:  # reported, so one failure does not hide the rest
        return {"variant": name, "kernel": kernel, "arch": f"sm_{arch}", "error": f"{type(err).__name__}: {err}"}


def jobs():
    """bf16 d=128 causal: the spill-free configs on sm_90 and the fallback on sm_80; every other
    variant: the fallback config on sm_90."""
    main, others = VARIANTS[0], VARIANTS[1:]
    plan_kernel = [(*variant, "plan", (16, 16, 1, 1), 90) for variant in (main, others[0])]  # causal; window
    return (plan_kernel + [(*main, kernel, config, 90) for kernel, config in SPILL_FREE.items()]
            + [(*main, kernel, SMALL, 80) for kernel in SPILL_FREE]
            + [(*variant, kernel, SMALL, 90) for variant in others for kernel in SPILL_FREE])


def worker_main():
    with ProcessPoolExecutor(2) as pool:
        print("RESULTS_JSON " + json.dumps(list(pool.map(_compile, jobs()))))


@pytest.fixture(scope="module")
def compiled():
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS_JSON ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULTS_JSON "):])


def test_every_variant_compiles_for_hopper_and_ampere(compiled):
    failures = [r for r in compiled if "error" in r]
    assert not failures, failures
    assert len(compiled) == len(jobs())


def attention_kernels(compiled):
    return [r for r in compiled if r["kernel"] != "_plan_runs"]


def test_plan_kernel_compiles_spill_free(compiled):
    plans = [r for r in compiled if r["kernel"] == "_plan_runs"]
    assert len(plans) == 2 and all(r["spill_stores"] == 0 for r in plans), plans


def test_tile_loads_are_pipelined(compiled):
    for r in attention_kernels(compiled):
        assert r["async_copies"] > 0, f"{r['variant']} {r['kernel']} {r['arch']}: loads not pipelined"


def test_hopper_uses_wgmma(compiled):
    """For 16-bit inputs (fp32 runs exact IEEE products, off the tensor cores). wgmma needs 64
    accumulator rows per warp group: queries in fwd/dq, keys in dK/dV."""
    for r in attention_kernels(compiled):
        rows = r["block_n"] if r["kernel"] == "_attn_bwd_dkdv" else r["block_m"]
        if r["arch"] == "sm_90" and rows >= 64 and not r["variant"].startswith("fp32"):
            assert r["wgmma"] > 0, f"{r['variant']} {r['kernel']}: no wgmma on sm_90"


def test_listed_configs_do_not_spill(compiled):
    listed = [r for r in attention_kernels(compiled) if r["variant"] == VARIANTS[0][0] and r["arch"] == "sm_90"]
    assert len(listed) == len(SPILL_FREE)
    for r in listed:
        assert r["spill_stores"] == 0, f"{r['kernel']} {r['block_m']}x{r['block_n']} spills: {r}"


if __name__ == "__main__":
    worker_main()
