"""build_attention: the one entry point the model's attention slot calls.

Strategies (ring, ulysses, ...) arrive in later issues; this version provides
``strategy="none"``, plain single-device attention through a local kernel.
"""

from __future__ import annotations

import torch

from lctrain_kernels.torch_blockwise import blockwise_attention

STRATEGIES = ("none",)
KERNELS = ("auto", "torch", "triton")


def _resolve_kernel(kernel: str) -> str:
    if kernel == "triton":
        raise ValueError(
            "the Triton kernel is not part of this version of lctrain; use kernel='torch' or 'auto'"
        )
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    return "torch"  # "auto" picks Triton on CUDA once that kernel exists


def check_attention_inputs(q, k, v, coords: dict[str, torch.Tensor | None], window) -> None:
    """Raise ValueError, naming the fix, for inputs the kernels cannot take."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch size and head_dim"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"q has {q.shape[2]} heads and k/v have {k.shape[2]}: the number of query heads must "
            f"be a multiple of the number of K/V heads (GQA)"
        )
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, seq_len = q.shape[0], q.shape[1]
    if k.shape[1] != seq_len:
        raise ValueError(
            f"q has {seq_len} tokens and k/v {k.shape[1]}: strategy 'none' attends a sequence to "
            f"itself, pass the same tokens for q, k and v"
        )
    for name, coord in coords.items():
        if coord is not None and tuple(coord.shape) not in ((seq_len,), (batch, seq_len)):
            raise ValueError(
                f"{name} must have shape ({seq_len},) or ({batch}, {seq_len}) to match q, "
                f"got {tuple(coord.shape)}"
            )
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of tokens or None, got {window}")


class LocalAttention:
    """Single-device attention (strategy "none") through one local kernel."""

    def __init__(self, kernel_name: str):
        self.kernel_name = kernel_name

    def __repr__(self) -> str:
        return f"LocalAttention(kernel_name={self.kernel_name!r})"

    def __call__(
        self, q, k, v, causal=True, doc_ids=None, window=None, positions=None, scale=None,
        return_lse=False,
    ):
        """q (b, s, h, d), k/v (b, s, h_kv, d) -> out (b, s, h, d) [and lse (b, h, s)].

        ``positions``: global position of each token, (s,) or (b, s), default
        arange(s); ``doc_ids``: same shapes, default one document, -1 = padding.
        """
        check_attention_inputs(q, k, v, {"positions": positions, "doc_ids": doc_ids}, window)
        seq_len = q.shape[1]
        if positions is None:
            positions = torch.arange(seq_len, device=q.device)
        if doc_ids is None:
            doc_ids = torch.zeros(seq_len, dtype=torch.long, device=q.device)
        positions, doc_ids = positions.to(q.device), doc_ids.to(q.device)
        out, lse = blockwise_attention(
            q, k, v, positions, positions, doc_ids, doc_ids, causal, window, scale
        )
        return (out, lse) if return_lse else out


def build_attention(strategy: str = "none", layout=None, group=None, kernel: str = "auto"):
    """The attention callable for ``strategy`` over ``layout`` / ``group`` with ``kernel``."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown attention strategy {strategy!r}; available in this version: {', '.join(STRATEGIES)}"
        )
    if layout is not None or group is not None:
        raise ValueError(
            "strategy 'none' is single-device attention: pass layout=None and group=None"
        )
    return LocalAttention(_resolve_kernel(kernel))
