"""Llama-family decoder written for one device, with exactly one attention slot.

Parallelism is applied from outside: the core attention (softmax(QK^T)V over
global token coordinates) is an injected callable, so swapping single-device
attention for ring/striped/tree attention never touches this file. The slot is
called as ``core(q, k, v, Coords(token_pos, doc_ids), Mask(causal=True, window))``.

An attention slot that overlaps two independent half-batches (attention servers
with ping-pong: ``core.interleaves_halves``) gets them layer by layer through
``Llama.interleaved_forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lctrain.models.rope import RopeScaling, rope_cos_sin, rope_frequencies
from lctrain_kernels.mask import Coords, Mask

# (q, k, v, coords, mask) -> out, tensors in (batch, seq, heads, head_dim)
CoreAttention = Callable[..., torch.Tensor]


@dataclass
class LlamaShape:
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    window: int | None = None  # sliding-window attention over this many tokens; None: full causal
    rope_scaling: RopeScaling | None = None  # context extension (lctrain.models.rope); None: plain RoPE
    rope_context_len: int = 0  # the context the model runs at (rope_scaling.type=dynamic)
    qkv_bias: bool = False  # biases on the q / k / v projections (Qwen2)
    mlp_tile_tokens: int = 0  # > 0: the MLP runs over tiles of this many tokens, recomputed in backward

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mask(self) -> Mask:
        return Mask(causal=True, window=self.window)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32: bf16 sums of squares lose the small components.
        compute = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(compute)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # "rotate half" convention (same as Hugging Face Llama weights). Under autocast x is the bf16
    # output of a projection and cos / sin are in the residual stream's dtype: rotate in the wider
    # one, return x's, so q, k and v reach the attention in one dtype.
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, core: CoreAttention):
        super().__init__()
        self.mask = shape.mask
        self.num_heads = shape.num_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.wq = nn.Linear(shape.dim, shape.num_heads * self.head_dim, bias=shape.qkv_bias)
        self.wk = nn.Linear(shape.dim, shape.num_kv_heads * self.head_dim, bias=shape.qkv_bias)
        self.wv = nn.Linear(shape.dim, shape.num_kv_heads * self.head_dim, bias=shape.qkv_bias)
        self.wo = nn.Linear(shape.num_heads * self.head_dim, shape.dim, bias=False)
        self.core = core

    def project_qkv(self, x, cos, sin):
        """q (b, s, h, d), k / v (b, s, h_kv, d) with RoPE applied."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.num_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, coords: Coords):
        q, k, v = self.project_qkv(x, cos, sin)
        return self.wo(self.core(q, k, v, coords, self.mask).reshape(*x.shape[:2], -1))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``. With ``tile_tokens`` the sequence goes through in tiles,
    each checkpointed, so the (tokens, ffn_dim) intermediates exist for one tile at a time in the
    forward and again in the backward (ALST's tiled MLP). The tile count depends only on the local
    sequence length, which every rank of a layout has the same: sharded engines see the same
    weight accesses on every rank."""

    def __init__(self, dim: int, ffn_dim: int, tile_tokens: int = 0):
        super().__init__()
        self.w_gate = nn.Linear(dim, ffn_dim, bias=False)
        self.w_up = nn.Linear(dim, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, dim, bias=False)
        self.tile_tokens = tile_tokens

    def _mlp(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    def forward(self, x):
        tile = self.tile_tokens
        if not tile or x.shape[1] <= tile:
            return self._mlp(x)
        grad = torch.is_grad_enabled() and x.requires_grad
        tiles = [x[:, start:start + tile] for start in range(0, x.shape[1], tile)]
        return torch.cat([checkpoint(self._mlp, t, use_reentrant=False) if grad else self._mlp(t) for t in tiles],
                         dim=1)


class Block(nn.Module):
    def __init__(self, shape: LlamaShape, core: CoreAttention):
        super().__init__()
        self.attn_norm = RMSNorm(shape.dim, shape.norm_eps)
        self.attn = Attention(shape, core)
        self.mlp_norm = RMSNorm(shape.dim, shape.norm_eps)
        self.mlp = SwiGLU(shape.dim, shape.ffn_dim, shape.mlp_tile_tokens)

    def forward(self, x, cos, sin, token_pos, doc_ids):
        x = x + self.attn(self.attn_norm(x), cos, sin, Coords(token_pos, doc_ids))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, shape: LlamaShape, core_attention: CoreAttention,
                 activation_checkpointing: bool = False, checkpoint_every: int = 1,
                 activation_offload: bool = False):
        super().__init__()
        if shape.dim % shape.num_heads or shape.num_heads % shape.num_kv_heads:
            raise ValueError(
                f"model shape: dim ({shape.dim}) must divide by num_heads ({shape.num_heads}) "
                f"and num_heads by num_kv_heads ({shape.num_kv_heads}); fix model.* overrides"
            )
        if shape.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {shape.head_dim}; change model.dim or model.num_heads")
        self.shape = shape
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_every = max(1, checkpoint_every)  # checkpoint blocks 0, k, 2k, ... (selective)
        self.activation_offload = activation_offload  # checkpointed blocks keep their input in host memory
        self.embed = nn.Embedding(shape.vocab_size, shape.dim)
        self.layers = nn.ModuleList(Block(shape, core_attention) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.dim, shape.norm_eps)
        self.lm_head = None if shape.tie_embeddings else nn.Linear(shape.dim, shape.vocab_size, bias=False)
        # float64, a plain attribute: a buffer would be cast with the weights' dtype
        self.inv_freq, self.rope_scale = rope_frequencies(shape.head_dim, shape.rope_theta, shape.rope_scaling,
                                                          shape.rope_context_len)
        self.reset_parameters()

    @property
    def core_attention(self) -> CoreAttention:
        """The one attention slot (every layer holds the same callable unless swapped per layer)."""
        return self.layers[0].attn.core

    def set_core_attention(self, core: CoreAttention | Sequence[CoreAttention]) -> None:
        """Fill the attention slot: one callable for every layer, or one per layer (a KV cache)."""
        cores = list(core) if isinstance(core, Sequence) else [core] * len(self.layers)
        if len(cores) != len(self.layers):
            raise ValueError(f"{len(cores)} attention callables for {len(self.layers)} layers")
        for block, layer_core in zip(self.layers, cores):
            block.attn.core = layer_core

    @contextmanager
    def attention_slot(self, core: CoreAttention | Sequence[CoreAttention]):
        """Run with ``core`` in the attention slot, then put the previous callables back."""
        previous = [block.attn.core for block in self.layers]
        self.set_core_attention(core)
        try:
            yield self
        finally:
            self.set_core_attention(previous)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.shape.init_std
        # Residual-branch outputs shrink with depth so the residual stream's
        # variance stays O(1) at init (GPT-2 / Llama practice).
        out_std = std / (2 * self.shape.num_layers) ** 0.5
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w_down.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def forward(self, input_ids, position_ids, doc_ids, token_pos=None) -> torch.Tensor:
        """Final hidden states (batch, seq, dim); logits are left to `loss`/`logits_at`.

        position_ids: in-document positions (RoPE). doc_ids: document of each token.
        token_pos: global index in the packed sequence (default arange), what
        sequence-parallel layouts shard and attention masks by.
        """
        if token_pos is None:
            token_pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if getattr(self.core_attention, "interleaves_halves", False) and not self._checkpointing():
            halves = split_point(doc_ids)
            if halves is not None:
                return self.interleaved_forward(input_ids, position_ids, doc_ids, token_pos, halves)
        x = self.embed(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        for index, block in enumerate(self.layers):
            if self._checkpointing() and index % self.checkpoint_every == 0:
                if self.activation_offload:  # the layer input waits in host memory for the recomputation
                    host = _to_host(x)
                    x = checkpoint(_on_device_block, block, x.device, host, cos, sin, token_pos, doc_ids,
                                   use_reentrant=False)
                else:
                    x = checkpoint(block, x, cos, sin, token_pos, doc_ids, use_reentrant=False)
            else:
                x = block(x, cos, sin, token_pos, doc_ids)
        return self.norm(x)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos / sin for in-document ``position_ids`` (training, evaluation and decoding alike)."""
        return rope_cos_sin(position_ids, self.inv_freq, dtype, self.rope_scale)

    def _checkpointing(self) -> bool:
        return self.activation_checkpointing and self.training

    def interleaved_forward(self, input_ids, position_ids, doc_ids, token_pos, halves) -> torch.Tensor:
        """``forward`` as two attention-independent halves run layer by layer, so one half's
        attention traffic overlaps the other half's projections and MLP (ping-pong).

        The slot's ``start(q, k, v, coords, mask, slot)`` posts a call, ``serve(pending)`` does
        a server's share of it and ``complete(pending, q, k, v)`` returns out. Per layer:
        serve A, serve B; complete A, A's wo + MLP, A's next-layer qkv, start A; the same for B.
        ``halves``: (dim, index) from ``split_point``; the result equals ``forward``'s.
        """
        dim, cut = halves
        core = self.core_attention

        def split(t):
            return list(t.split([cut, t.shape[dim] - cut], dim=dim))

        x = self.embed(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        xs, coss, sins = split(x), split(cos), split(sin)
        coords = [Coords(p, d) for p, d in zip(split(token_pos), split(doc_ids))]
        pending, qkv = [None, None], [None, None]

        def start(i, block):
            qkv[i] = block.attn.project_qkv(block.attn_norm(xs[i]), coss[i], sins[i])
            pending[i] = core.start(*qkv[i], coords[i], block.attn.mask, slot=i)

        def finish(i, block):
            out = core.complete(pending[i], *qkv[i])
            h = xs[i] + block.attn.wo(out.reshape(*xs[i].shape[:2], -1))
            xs[i] = h + block.mlp(block.mlp_norm(h))

        for i in (0, 1):
            start(i, self.layers[0])
        for index, block in enumerate(self.layers):
            for i in (0, 1):
                core.serve(pending[i])
            for i in (0, 1):
                finish(i, block)
                if index + 1 < len(self.layers):
                    start(i, self.layers[index + 1])
        return self.norm(torch.cat(xs, dim=dim))

    def logits_at(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits only where mask is true: (num_true, vocab)."""
        logits = F.linear(hidden[mask], self.output_weight)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A differentiable host copy of ``x``: pinned and asynchronous from a GPU (the copy back in the
    recomputation is ordered after it on the same stream); a plain copy on CPU."""
    if not x.is_cuda:
        return x.to("cpu", copy=True)
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)


def _on_device_block(block, device, host_x, *args):
    """A block on the device copy of its host-held input (activation offload): the checkpoint keeps
    only ``host_x``, and the copy back runs again in the recomputation."""
    return block(host_x.to(device, non_blocking=True), *args)


def split_point(doc_ids: torch.Tensor) -> tuple[int, int] | None:
    """(dim, index) splitting a (b, s) batch into two attention-independent halves: batch rows,
    or for one row the document boundary closest to the middle; None when there is none."""
    batch, seq = doc_ids.shape
    if batch >= 2:
        return 0, batch // 2
    boundaries = (doc_ids[0, 1:] != doc_ids[0, :-1]).nonzero().flatten() + 1
    if len(boundaries) == 0:
        return None
    return 1, int(boundaries[(boundaries - seq / 2).abs().argmin()])
