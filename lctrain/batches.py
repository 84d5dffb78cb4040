"""A micro batch on its way to the model: global positions added, padded to the layout's
multiple and dealt to this rank's cp shard."""

from __future__ import annotations

import torch

from lctrain.data.sample import IGNORE_INDEX
from lctrain_kernels.mask import PAD_DOC

# Padding is its own masked document, excluded from the loss.
PAD_VALUES = {"labels": IGNORE_INDEX, "doc_ids": PAD_DOC, "position_ids": 0, "answer_mask": False}


def pad_to(x: torch.Tensor, multiple: int, key: str, pad_id: int) -> torch.Tensor:
    """Pad (b, s) along s to a multiple of ``multiple``: global positions continue, every
    other key takes its ``PAD_VALUES`` entry (token ids: ``pad_id``)."""
    extra = -x.shape[1] % multiple
    if not extra:
        return x
    if key == "token_pos":
        tail = torch.arange(x.shape[1], x.shape[1] + extra).expand(x.shape[0], extra)
    else:
        tail = torch.full((x.shape[0], extra), PAD_VALUES.get(key, pad_id), dtype=x.dtype)
    return torch.cat([x, tail], dim=1)


def prepare_batch(batch: dict[str, torch.Tensor], layout, cp_rank: int, pad_id: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Add ``token_pos`` (global index in the packed sequence) and, with a layout, keep only
    this rank's shard of every key; then move to ``device``."""
    b, s = batch["input_ids"].shape
    batch = {**batch, "token_pos": torch.arange(s).expand(b, s)}
    if layout is not None:
        batch = {k: layout.shard(pad_to(v, layout.multiple, k, pad_id), cp_rank, dim=1) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
