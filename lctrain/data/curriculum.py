"""Short-to-long document curriculum shared by the synthetic tasks (copy, recall).

Sample ``index`` < ``samples`` packs several documents of ``doc_len(index)`` tokens into one
sequence: the first half of the curriculum at ``min_doc_len`` (where a skill forms fastest: many
documents, so many targets per step, and little to attend over), the second half growing
geometrically to ``seq_len``; from ``samples`` on (and for every eval sample, whose indices
start far beyond) each sequence is one full-length document. A pure function of the index, so
resuming is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from lctrain.data.sample import IGNORE_INDEX, build_sample


class Curriculum:
    def __init__(self, seq_len: int, samples: int, min_doc_len: int, prefix: str):
        if samples < 0 or not 8 <= min_doc_len <= seq_len:
            raise ValueError(f"data.{prefix}_curriculum_samples must be >= 0 and 8 <= data.{prefix}_min_doc_len "
                             f"<= data.seq_len, got {samples} and {min_doc_len}")
        self.seq_len, self.samples, self.min_doc_len = seq_len, samples, min_doc_len

    def doc_len(self, index: int) -> int:
        """Document length of sample ``index`` (seq_len once the curriculum is over)."""
        hold = self.samples // 2
        if index >= self.samples:
            return self.seq_len
        if index < hold:
            return self.min_doc_len
        growth = (self.seq_len / self.min_doc_len) ** ((index - hold) / (self.samples - hold))
        return min(self.seq_len, int(self.min_doc_len * growth))

    def lengths(self, index: int) -> list[int]:
        """The document lengths packed into sample ``index`` (the last takes the remainder)."""
        doc_len = self.doc_len(index)
        lengths = [doc_len] * (self.seq_len // doc_len - 1)
        return lengths + [self.seq_len - sum(lengths)]


def doc_arrays(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids, positions restarting at 0 in each document) for packed ``lengths``."""
    doc_ids = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
    return doc_ids, np.arange(sum(lengths)) - starts


def answers_only_sample(tokens: np.ndarray, answers: np.ndarray, lengths: list[int]) -> dict[str, torch.Tensor]:
    """The sample of packed documents of ``lengths`` whose only labels are the ``answers`` tokens
    (every other label would be noise on the gradient: nothing predicts it)."""
    doc_ids, positions = doc_arrays(lengths)
    sample = build_sample(tokens, doc_ids, positions, answers)
    sample["labels"] = torch.where(sample["answer_mask"], sample["labels"], IGNORE_INDEX)
    return sample
