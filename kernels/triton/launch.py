"""Compiling and launching the Triton attention kernels: interpreter or GPU, autotuning, checks.

Kernels and their ``@triton.jit`` helpers are written as plain functions and wrapped lazily, for
the mode the process runs in: Triton decides interpreter or compiled at decoration time (from
``TRITON_INTERPRET``), and its language helpers are wrapped for the interpreter, or not, when
triton is first imported. So ``TRITON_INTERPRET=1`` must be set before anything imports triton
(a clear error says so otherwise); importing these modules first does no harm.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch

from .consts import BIG, LEVEL_BLOCKS

try:
    import triton
    import triton.language as tl
except ImportError:  # the modules stay importable; using a kernel raises
    triton = tl = None

NO_BOUND = BIG if tl is None else tl.constexpr(BIG)  # "no bound" inside kernels (a constexpr global)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_BLOCK = 16  # fixed small tiles under the interpreter: fast and many tiles per test

# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M tiles queries, BLOCK_N keys. Chosen from
# the static compile data of bench/kernel_compile.py: spill-free (or nearly) on sm_90 for bf16
# head dims 64 and 128; dK/dV holds two fp32 accumulators and K, V per key tile, hence its
# small query tiles.
FWD_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
               (128, 32, 8, 3), (64, 32, 4, 2)]
DKDV_CONFIGS = [(16, 64, 8, 2), (32, 64, 8, 2), (16, 128, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2),
                (32, 64, 8, 3)]
DQ_CONFIGS = [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2)]
FALLBACK_CONFIG = (64, 32, 4, 2)  # fits every GPU and head dim: used when pruning leaves nothing
TUNE_KEY = ["TUNE_SQ", "TUNE_SK", "BLOCK_D", "CAUSAL", "HAS_WINDOW", "DOT_PREC"]
# Modules whose globals hold kernels and device functions (rebound per mode, see bind_mode).
KERNEL_MODULES = ("lctrain_kernels.triton.plan_kernel", "lctrain_kernels.triton.tiles",
                  "lctrain_kernels.triton.forward", "lctrain_kernels.triton.backward")


def require_triton():
    if triton is None:
        raise RuntimeError(
            "kernel='triton' needs the triton package, which is not installed; "
            "pip install triton (Linux x86_64) or use kernel='torch'"
        )


_captured: list[list | None] = [None]


@contextmanager
def capture_launches():
    """Record launches (spec, grid_len, shape, args, consts) instead of running them, with the
    arguments a GPU run would get: lets ``triton_inspect`` compile the kernels without a GPU."""
    calls: list = []
    _captured[0] = calls
    try:
        yield calls
    finally:
        _captured[0] = None


def interpret_mode(device: torch.device) -> bool:
    """CPU tensors (or TRITON_INTERPRET=1) run through the Triton interpreter."""
    if _captured[0] is not None:
        return False
    interpret = device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    # triton.language's own helpers (tl.max, tl.sum, ...) are wrapped for the interpreter, or
    # not, once, when triton is first imported: a later switch cannot reach them.
    if interpret and isinstance(tl.max, triton.runtime.JITFunction):
        raise RuntimeError(
            "triton attention on CPU tensors runs through the Triton interpreter, which must be "
            "enabled before triton is first imported: set TRITON_INTERPRET=1 in the environment "
            "of the process (e.g. `TRITON_INTERPRET=1 python ...`), or use kernel='torch'"
        )
    return interpret


# ------------------------------------------------------------------------- device functions

_DEVICE_FNS: dict[str, object] = {}  # name -> plain function, in definition order
_WRAPPED: dict[bool, dict[str, object]] = {}
_bound_mode: list[bool | None] = [None]


def device_fn(fn):
    """Mark a ``@triton.jit`` helper; it is wrapped for the process' mode by ``bind_mode``."""
    _DEVICE_FNS[fn.__name__] = fn
    return fn


def _jit(fn, interpret: bool):
    if not interpret:
        return triton.jit(fn)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # Triton 3.x decides at decoration time
    try:
        return triton.jit(fn)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def bind_mode(interpret: bool) -> None:
    """Point every kernel module's device-function names at their wrap for this mode: a kernel
    resolves the helpers it calls through its module's globals when it runs or compiles."""
    if _bound_mode[0] == interpret:
        return
    if interpret not in _WRAPPED:
        _WRAPPED[interpret] = {name: _jit(fn, interpret) for name, fn in _DEVICE_FNS.items()}
    for module_name in KERNEL_MODULES:
        module = sys.modules.get(module_name)
        for name, wrapped in _WRAPPED[interpret].items():
            if module is not None and name in vars(module):
                setattr(module, name, wrapped)
    _bound_mode[0] = interpret


# ----------------------------------------------------------------------------------- autotune


def _shared_memory_limit(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # unknown driver: assume the smallest recent NVIDIA limit
        return 99 * 1024


def config_fits(block_streamed: int, block_kept: int, stages: int, block_d: int, elem: int,
                limit: int) -> bool:
    """Whether pipelined tiles fit shared memory: two streamed tiles per stage (K and V, or Q
    and dO), two resident ones; and the kept block's fp32 accumulator fits the registers."""
    smem = (stages * 2 * block_streamed + 2 * block_kept) * block_d * elem
    return smem <= limit and block_kept * block_d <= 128 * 128


def _prune(streamed: str, kept: str):
    """early_config_prune: drop configs that do not fit (``config_fits``)."""

    def prune(configs, named_args, **kwargs):
        block_d, elem = kwargs["BLOCK_D"], named_args["Q"].element_size()
        limit = _shared_memory_limit(named_args["Q"].device.index or 0)
        fitting = [cfg for cfg in configs
                   if config_fits(cfg.kwargs[streamed], cfg.kwargs[kept], cfg.num_stages, block_d, elem, limit)]
        if fitting:
            return fitting
        block_m, block_n, warps, _ = FALLBACK_CONFIG
        return [triton.Config(blocks(block_m, block_n), num_warps=warps, num_stages=1)]

    return prune


def blocks(block_m: int, block_n: int) -> dict:
    """Block constexprs (powers of two from 16 to 256: the kernels merge 16-token runs)."""
    for block in (block_m, block_n):
        if block not in LEVEL_BLOCKS:
            raise ValueError(f"triton block sizes must be one of {LEVEL_BLOCKS}, got {block}")
    return {"BLOCK_M": block_m, "BLOCK_N": block_n}


_KERNELS: dict = {}


def get_kernel(spec, interpret: bool, tuned: bool):
    """The spec's kernel wrapped for the interpreter, or jit-compiled (autotuned when ``tuned``)."""
    body, configs, streamed, kept = spec
    bind_mode(interpret)
    key = (body.__name__, interpret, tuned)
    if key not in _KERNELS:
        kernel = _jit(body, interpret)
        if tuned and not interpret:
            kernel = triton.autotune(
                configs=[triton.Config(blocks(m, n), num_warps=w, num_stages=s) for m, n, w, s in configs],
                key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune(streamed, kept)},
            )(kernel)
        _KERNELS[key] = kernel
    return _KERNELS[key]


def launch(spec, grid_len: str, shape: tuple[int, int], args: list, consts: dict,
           interpret: bool, block_q: int | None, block_k: int | None) -> None:
    """Launch with a fixed config (interpreter, or explicit blocks) or through the autotuner.

    ``grid_len`` names the block that tiles the program axis ("BLOCK_M" or "BLOCK_N");
    ``shape`` is (that axis' length, number of programs along the batch*head axis)."""
    if _captured[0] is not None:
        _captured[0].append((spec, grid_len, shape, args, consts))
        return
    fixed = interpret or block_q is not None or block_k is not None
    kernel = get_kernel(spec, interpret, tuned=not fixed)
    if fixed:
        block_m = block_q or (INTERPRETER_BLOCK if interpret else FALLBACK_CONFIG[0])
        block_n = block_k or (INTERPRETER_BLOCK if interpret else FALLBACK_CONFIG[1])
        tiles = blocks(block_m, block_n)
        grid = (triton.cdiv(shape[0], tiles[grid_len]), shape[1])
        launch_opts = {} if interpret else {"num_warps": FALLBACK_CONFIG[2], "num_stages": FALLBACK_CONFIG[3]}
        kernel[grid](*args, **consts, **tiles, **launch_opts)
    else:
        kernel[lambda meta: (triton.cdiv(shape[0], meta[grid_len]), shape[1])](*args, **consts)


def launch_grid(spec, grid: tuple, args: list, consts: dict, interpret: bool) -> None:
    """A kernel on a fixed grid, one warp per program, no autotuning (the tile plan)."""
    if _captured[0] is not None:
        _captured[0].append((spec, None, grid, args, consts))
        return
    launch_opts = {} if interpret else {"num_warps": 1, "num_stages": 1}
    get_kernel(spec, interpret, tuned=False)[grid](*args, **consts, **launch_opts)


# ------------------------------------------------------------------------------ inputs


def check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("triton attention takes q (b, sq, h, d), k and v (b, sk, h_kv, d)")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"triton attention supports float16, bfloat16 and float32 (q, k, v alike), got "
            f"{q.dtype}/{k.dtype}/{v.dtype}; use kernel='torch' for float64"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of K/V heads ({k.shape[2]})")
    if q.shape[3] > 256:
        raise ValueError(f"triton attention supports head dims up to 256, got {q.shape[3]}; use kernel='torch'")


def kernel_inputs(interpret: bool, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Last dim contiguous. Under the interpreter bfloat16 runs as float32: Triton 3.x's
    interpreter keeps bf16 as raw uint16 and computes wrong values from it."""
    if interpret and tensors[0].dtype == torch.bfloat16:
        tensors = tuple(t.float() for t in tensors)
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def common_consts(q, seq_q, seq_k, mask):
    return {
        "TUNE_SQ": triton.next_power_of_2(max(seq_q, 1)), "TUNE_SK": triton.next_power_of_2(max(seq_k, 1)),
        "CAUSAL": bool(mask.causal), "HAS_WINDOW": mask.window is not None,
        "HEAD_DIM": q.shape[3], "BLOCK_D": max(16, triton.next_power_of_2(q.shape[3])),
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32",
    }
