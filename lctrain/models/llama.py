"""Llama-family decoder written for one device, with exactly one attention slot.

Parallelism is applied from outside: the core attention (softmax(QK^T)V over
global token coordinates) is an injected callable, so swapping single-device
attention for ring/striped/tree attention never touches this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# (q, k, v, *, causal, doc_ids, positions) -> out, tensors in (batch, seq, heads, head_dim)
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


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


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape (batch, seq, 1, head_dim) for explicit per-token positions.

    Positions are in-document positions supplied by the data pipeline, so a packed
    document or a sequence shard sees the same rotation as a lone document would.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=position_ids.device, dtype=compute) / head_dim
    )
    angles = position_ids.to(compute)[..., None] * inv_freq  # (b, s, d/2)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # "rotate half" convention (same as Hugging Face Llama weights).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, core: CoreAttention):
        super().__init__()
        self.num_heads = shape.num_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.wq = nn.Linear(shape.dim, shape.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(shape.dim, shape.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(shape.dim, shape.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(shape.num_heads * self.head_dim, shape.dim, bias=False)
        self.core = core

    def project_qkv(self, x, cos, sin):
        """q (b, s, h, d), k / v (b, s, h_kv, d) with RoPE applied; split out for ping-pong drivers."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.num_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, doc_ids, token_pos):
        q, k, v = self.project_qkv(x, cos, sin)
        out = self.core(q, k, v, causal=True, doc_ids=doc_ids, positions=token_pos)
        return self.wo(out.reshape(*x.shape[:2], -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, ffn_dim, bias=False)
        self.w_up = nn.Linear(dim, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, shape: LlamaShape, core: CoreAttention):
        super().__init__()
        self.attn_norm = RMSNorm(shape.dim, shape.norm_eps)
        self.attn = Attention(shape, core)
        self.mlp_norm = RMSNorm(shape.dim, shape.norm_eps)
        self.mlp = SwiGLU(shape.dim, shape.ffn_dim)

    def forward(self, x, cos, sin, doc_ids, token_pos):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, token_pos)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, shape: LlamaShape, core_attention: CoreAttention,
                 activation_checkpointing: bool = False):
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
        self.embed = nn.Embedding(shape.vocab_size, shape.dim)
        self.layers = nn.ModuleList(Block(shape, core_attention) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.dim, shape.norm_eps)
        self.lm_head = None if shape.tie_embeddings else nn.Linear(shape.dim, shape.vocab_size, bias=False)
        self.reset_parameters()

    def set_core_attention(self, core: CoreAttention) -> None:
        """The one attention slot: every layer shares the same core attention."""
        for block in self.layers:
            block.attn.core = core

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
            if p.dim() == 1:
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
        x = self.embed(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.shape.head_dim, self.shape.rope_theta, x.dtype)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, doc_ids, token_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, doc_ids, token_pos)
        return self.norm(x)

    def logits_at(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits only where mask is true: (num_true, vocab)."""
        logits = F.linear(hidden[mask], self.output_weight)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_ce_sum(hidden, weight, labels):
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Sum of token cross-entropies without materialising (tokens, vocab) logits.

    Each chunk's logits are recomputed in backward (checkpointed), so peak memory
    is one chunk of logits however long the sequence is.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start:start + chunk_tokens]
        y = labels[start:start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_ce_sum, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, weight, y)
    return total
