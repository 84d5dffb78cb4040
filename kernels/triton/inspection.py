"""Compile the Triton attention kernels for a GPU target without a GPU, and read what came out.

Triton compiles ahead of time from Python to PTX and a cubin with its bundled ptxas, so this
works on any Linux machine with triton installed. The arguments are the ones a real call would
pass (captured from ``triton_forward``/``triton_backward`` on CPU tensors of the same shapes),
specialised the way Triton's launcher does it (ints equal to 1 become constants, ints and
pointers divisible by 16 get the divisibility hint). What it reports is static:

- ``async_copies`` / ``tma_copies``: loads the software pipeliner turned into asynchronous
  copies (0 means every tile load stalls the loop);
- ``wgmma``: Hopper warp-group MMAs (0 on sm_90 means the slower mma.sync path);
- ``registers``, ``spill_stores`` (STL instructions in the SASS), ``shared_bytes``.

It says nothing about speed on its own; it catches code that cannot be fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

import torch

from ..mask import Coords, Mask
from .launch import bind_mode, blocks, capture_launches, triton

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64",
                  torch.int32: "i32"}


def captured_calls(dtype=torch.bfloat16, seq=1024, heads=32, kv_heads=8, head_dim=128, causal=True,
                   window=None, docs=1) -> dict:
    """{"fwd", "dkdv", "dq", "plan"}: (spec, args, consts) of one forward and backward call
    ("plan": the query side's tile plan kernel)."""
    from .attention import triton_backward, triton_forward

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq, heads, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(1, seq, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    pos = torch.arange(seq)
    doc = pos * docs // seq  # `docs` equal documents packed
    with capture_launches() as calls:
        coords, mask = Coords(pos, doc), Mask(causal, window)
        triton_forward(q, k, v, coords, coords, mask)
        out, lse = torch.zeros_like(q), torch.zeros(1, heads, seq)
        triton_backward(q, q, k, v, out, lse, coords, coords, mask)
    names = {"_attn_fwd": "fwd", "_attn_bwd_dkdv": "dkdv", "_attn_bwd_dq": "dq", "_plan_runs": "plan"}
    captured = {}
    for spec, _, _, args, consts in calls:
        captured.setdefault(names[spec[0].__name__], (spec, args, consts))
    return captured


def _signature(body, args: list, consts: dict):
    """Triton's launch-time specialisation of ``args``: signature, constants and attributes."""
    import inspect

    names = list(inspect.signature(body).parameters)
    runtime = names[: len(args)]
    signature, constants, attrs = {}, dict(consts), {}
    for index, (name, value) in enumerate(zip(runtime, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in names[len(args):]:
        signature[name] = "constexpr"
    return signature, constants, attrs


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_stats(call, config: tuple[int, int, int, int], arch: int = 90) -> dict:
    """Compile one captured call with (BLOCK_M, BLOCK_N, num_warps, num_stages) for sm_<arch>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec, args, consts = call
    body = spec[0]
    block_m, block_n, warps, stages = config
    bind_mode(interpret=False)
    fn = triton.jit(body)
    tiles = blocks(block_m, block_n) if spec[1] is not None else {}  # the plan kernel has no tiles
    signature, constants, attrs = _signature(body, args, {**consts, **tiles})
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    ttgir = kernel.asm["ttgir"]
    ops = Counter(re.findall(r"\b(ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local"
                             r"|ttng\.warp_group_dot|tt\.dot)\b", ttgir))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as handle:
            handle.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    return {
        "kernel": body.__name__, "arch": f"sm_{arch}", "block_m": block_m, "block_n": block_n,
        "num_warps": warps, "num_stages": stages,
        "async_copies": ops["ttg.async_copy_global_to_local"],
        "tma_copies": ops["ttng.async_tma_copy_global_to_local"],
        "wgmma": ops["ttng.warp_group_dot"], "mma": ops["tt.dot"],
        "registers": int(registers.group(1)) if registers else None,
        "spill_stores": len(re.findall(r"\bSTL(\.\w+)*\b", sass)),
        "shared_bytes": int(kernel.metadata.shared),
    }
