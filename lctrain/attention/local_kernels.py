"""The local kernels a strategy runs per block, behind one interface.

Every kernel takes separate query and key coordinates (``Coords``) and a ``Mask``,
returns fp32 lse and accepts an external (merged) lse in backward, so any
strategy can run on any of them:

- ``torch``: the blockwise PyTorch kernel (any device, any float dtype, fp64 too);
- ``triton``: the Triton kernels (CUDA; on CPU through the Triton interpreter,
  which must be enabled with ``TRITON_INTERPRET=1`` before triton is imported);
- ``auto``: Triton for CUDA tensors of fp16/bf16/fp32 when triton is
  installed, otherwise the PyTorch kernel. Resolved per call, from the tensors.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from lctrain_kernels.torch_blockwise import blockwise_attention, blockwise_backward, blockwise_forward

KERNEL_NAMES = ("torch", "auto", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class LocalKernel:
    name: str
    forward: Callable  # (q, k, v, q_coords, k_coords, mask, scale=None, out_dtype=None) -> (out, lse)
    backward: Callable  # (dout, q, k, v, out, lse, q_coords, k_coords, mask, scale=None, delta=None)
    #                      -> (dq, dk, dv) in the accumulation dtype
    attention: Callable  # differentiable (q, k, v, q_coords, k_coords, mask, scale=None) -> (out, lse)


TORCH_KERNEL = LocalKernel("torch", blockwise_forward, blockwise_backward, blockwise_attention)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_kernel() -> LocalKernel:
    from lctrain_kernels.triton.attention import triton_attention, triton_backward, triton_forward

    return LocalKernel("triton", triton_forward, triton_backward, triton_attention)


def check_kernel_name(name: str) -> str:
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; choose one of {', '.join(KERNEL_NAMES)}")
    if name == "triton" and not triton_installed():
        raise ValueError("kernel='triton' needs the triton package (pip install triton); use kernel='torch'")
    return name


def resolve_kernel(name: str, q: torch.Tensor) -> LocalKernel:
    """The kernel that ``name`` means for a call on tensors like ``q``."""
    if name == "torch":
        return TORCH_KERNEL
    if name == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise ValueError(f"kernel='triton' takes fp16, bf16 or fp32, got {q.dtype}; use kernel='torch'")
        return _triton_kernel()
    use_triton = q.is_cuda and q.dtype in TRITON_DTYPES and triton_installed()
    return _triton_kernel() if use_triton else TORCH_KERNEL


def as_local_kernel(kernel: LocalKernel | str | None, q: torch.Tensor) -> LocalKernel:
    """A strategy's ``kernel`` argument: a LocalKernel, a name, or None (the PyTorch kernel)."""
    if kernel is None:
        return TORCH_KERNEL
    if isinstance(kernel, str):
        return resolve_kernel(check_kernel_name(kernel), q)
    return kernel
