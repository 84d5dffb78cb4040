"""Long-range copy: the built-in task of ``make train``, learnable in minutes on CPUs.

A sequence is one document

    BOS, r_1 ... r_D, r_1 ... r_C, EOS

with r drawn from ``alphabet`` token ids placed after the tokenizer's vocabulary (so they are
never text), without repetition when the alphabet is large enough. Every token of the copy
equals the token exactly ``distance`` = D positions before it, and nothing else predicts it:
the copy can only be produced by attending D tokens back, and the random first half gives
nothing to learn. So the copy tokens are the only targets (``answer_mask``; every other label
is ignored): thousands of answers per sequence, which is why a tiny model learns the skill in
a few hundred steps where one needle per sequence (passkey) would need far more. Unique
tokens let it learn the skill as an induction circuit (find the current token earlier, copy
the one after it), which gradient descent finds much faster than an exact 2047-token offset.
Chance is 1/alphabet per token. The model's vocabulary must hold the tokenizer's and the
alphabet (``vocab_size_needed``).

The default distance is the largest odd number that fits twice: 2047 at 4096 tokens. Odd,
so that under the striped layout a token and its source always sit on different cp ranks
(and under contiguous or zigzag ones the copy lies in the other half of the sequence): the
skill needs attention across the ranks that hold the sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from lctrain.data.sample import IGNORE_INDEX, build_sample, check_index, check_seed, sample_rng
from lctrain.data.tokenizer import ByteTokenizer, Tokenizer


def default_distance(seq_len: int) -> int:
    """The largest odd D with BOS + D tokens + a copy of D tokens + EOS inside seq_len."""
    distance = (seq_len - 2) // 2
    return distance if distance % 2 else distance - 1


class LongCopyDataset:
    """Deterministic, infinite stream of copy sequences; sample i is a function of (seed, i)."""

    def __init__(self, seq_len: int, seed: int, tokenizer: Tokenizer | None = None, distance: int = 0,
                 alphabet: int = 4096):
        check_seed(seed)
        self.seq_len, self.seed = seq_len, seed
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.distance = distance or default_distance(seq_len)
        if not 1 <= self.distance <= seq_len - 3:
            raise ValueError(f"data.copy_distance={distance} does not fit data.seq_len={seq_len}: need "
                             f"1 <= distance <= seq_len - 3 (0 picks {default_distance(seq_len)})")
        if alphabet < 2:
            raise ValueError(f"data.copy_alphabet={alphabet}: need at least 2 random token ids")
        self.alphabet = alphabet
        self.first_id = self.tokenizer.vocab_size  # random ids follow the tokenizer's: never text
        self.vocab_size_needed = self.first_id + alphabet
        self.copy_len = min(self.distance, seq_len - self.distance - 2)

    @classmethod
    def from_config(cls, data, tokenizer: Tokenizer) -> LongCopyDataset:
        """The dataset ``data=copy`` describes (a ``DataConfig``)."""
        return cls(seq_len=data.seq_len, seed=data.seed, tokenizer=tokenizer, distance=data.copy_distance,
                   alphabet=data.copy_alphabet)

    @property
    def chance(self) -> float:
        return 1.0 / self.alphabet

    def describe(self, accuracy: float) -> str:
        """The final line's metric: accuracy, its chance level and the distance it needs."""
        return (f"long-range copy accuracy {100 * accuracy:.1f}% (chance {100 * self.chance:.1f}%) "
                f"at {self.distance} tokens back")

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        check_index(index)
        rng = sample_rng(self.seed, index)
        unique = self.alphabet >= self.distance
        source = self.first_id + rng.choice(self.alphabet, size=self.distance, replace=not unique)
        copy = source[: self.copy_len]
        tail = self.seq_len - 1 - self.distance - self.copy_len  # random filler, then EOS
        filler = self.first_id + rng.integers(0, self.alphabet, size=tail - 1)
        tokens = np.concatenate([[self.tokenizer.bos_id], source, copy, filler, [self.tokenizer.eos_id]])
        is_copy = np.zeros(self.seq_len, dtype=bool)
        is_copy[1 + self.distance: 1 + self.distance + self.copy_len] = True
        sample = build_sample(tokens, np.zeros(self.seq_len, dtype=np.int64), np.arange(self.seq_len), is_copy)
        # Only the copy is learnable: every other label would be noise on the gradient.
        sample["labels"] = torch.where(sample["answer_mask"], sample["labels"], IGNORE_INDEX)
        return sample
