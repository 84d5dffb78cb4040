"""The sample format shared by every dataset.

A sample is a dict of 1-D tensors of length seq_len (see `SAMPLE_KEYS`):

- `input_ids`   int64  token ids of the packed sequence
- `labels`      int64  next token of the SAME document, -100 where there is
                       none (a document's last token, the sequence's last
                       token), so the loss never crosses a document boundary
- `position_ids` int64 position inside the document (RoPE); 0 at a document's
                       first token, continuing the real positions for a piece
                       of a document split across sequences
- `doc_ids`     int64  0, 1, 2, ... per document within the sequence,
                       non-decreasing (what the attention mask compares)
- `answer_mask` bool   True where the LABEL is a token the model must retrieve
                       (passkey answer digits); all False for plain text

The global token index (`token_pos`, what layouts shard and the mask compares
positions of) is the index in the sequence, so it is not stored: the trainer
adds `arange(seq_len)` before any layout shards the batch.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100
SAMPLE_KEYS = ("input_ids", "labels", "position_ids", "doc_ids", "answer_mask")


def build_sample(
    tokens: np.ndarray,
    doc_ids: np.ndarray,
    position_ids: np.ndarray,
    answer_token_mask: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Assemble a sample from per-token arrays.

    `answer_token_mask` marks the answer tokens themselves; the sample's
    `answer_mask` is shifted one left so it lines up with `labels`.
    """
    seq_len = len(tokens)
    assert len(doc_ids) == len(position_ids) == seq_len
    assert np.all(doc_ids[:-1] <= doc_ids[1:]), "documents must be contiguous"
    input_ids = tokens.astype(np.int64, copy=False)
    same_doc_next = doc_ids[:-1] == doc_ids[1:]
    labels = np.empty(seq_len, dtype=np.int64)
    np.copyto(labels[:-1], np.where(same_doc_next, input_ids[1:], IGNORE_INDEX))
    labels[-1] = IGNORE_INDEX
    answer_mask = np.zeros(seq_len, dtype=bool)
    if answer_token_mask is not None:
        assert not answer_token_mask[0], "an answer token always has a predecessor in its document"
        answer_mask[:-1] = answer_token_mask[1:] & same_doc_next
    arrays = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids.astype(np.int64, copy=False),
        "doc_ids": doc_ids.astype(np.int64, copy=False),
        "answer_mask": answer_mask,
    }
    return {key: torch.from_numpy(arrays[key]) for key in SAMPLE_KEYS}


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index`: a pure function of (seed, index)."""
    return np.random.Generator(np.random.PCG64([seed, index]))


def check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}; pick a non-negative integer")


def check_index(index: int) -> None:
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
