"""The training loss over the model's hidden states, without (tokens, vocab) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lctrain.data.sample import IGNORE_INDEX


def _chunk_ce_sum(hidden, weight, labels):
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


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
