"""Long-range copy: the built-in task of ``make train``, learnable in minutes on CPUs.

A sequence is one document

    BOS, r_1 ... r_D, r_1 ... r_C, EOS

with r drawn from ``alphabet`` token ids placed after the tokenizer's vocabulary (so they are
never text), without repetition when the alphabet is large enough; ``tokens="text"`` draws them
from the tokenizer's own digits and letters instead (at most 62), so the copy circuit is learned
on the tokens a text task such as passkey copies (its warm start). Every token of the copy
equals the token exactly ``distance`` = D positions before it, and nothing else predicts it:
the copy can only be produced by attending D tokens back, and the random first half gives
nothing to learn. So the copy tokens are the only targets (``answer_mask``; every other label
is ignored): thousands of answers per sequence, which is why a tiny model learns the skill in
a few hundred steps where one needle per sequence (passkey) would need far more. Unique
tokens let it learn the skill as an induction circuit (find the current token earlier, copy
the one after it), which gradient descent finds much faster than an exact 2047-token offset.
Chance is 1/alphabet per token. The model's vocabulary must hold the tokenizer's and the
alphabet (``vocab_size_needed``).

A curriculum (``curriculum_samples`` > 0) packs several shorter copy documents into each
sequence at first: the first half of the ``curriculum_samples`` samples hold documents of
``min_doc_len`` tokens, the second half documents growing geometrically to seq_len (each
document its own copy at L/2 - 1 back, with its own doc id). The copy circuit forms fastest over short spans
and then stretches to the full distance; held-out (eval) samples are always full length.

The default distance is the largest odd number that fits twice: 2047 at 4096 tokens. Odd,
so that under the striped layout a token and its source always sit on different cp ranks
(and under contiguous or zigzag ones the copy lies in the other half of the sequence): the
skill needs attention across the ranks that hold the sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from lctrain.data.curriculum import Curriculum, answers_only_sample
from lctrain.data.sample import check_index, check_seed, sample_rng
from lctrain.data.tokenizer import ByteTokenizer, Tokenizer


COPY_TOKENS = ("fresh", "text")
TEXT_SYMBOLS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def default_distance(seq_len: int) -> int:
    """The largest odd D with BOS + D tokens + a copy of D tokens + EOS inside seq_len."""
    distance = (seq_len - 2) // 2
    return distance if distance % 2 else distance - 1


class LongCopyDataset:
    """Deterministic, infinite stream of copy sequences; sample i is a function of (seed, i)."""

    def __init__(self, seq_len: int, seed: int, tokenizer: Tokenizer | None = None, distance: int = 0,
                 alphabet: int = 4096, curriculum_samples: int = 0, min_doc_len: int = 256,
                 tokens: str = "fresh"):
        check_seed(seed)
        self.seq_len, self.seed = seq_len, seed
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.distance = distance or default_distance(seq_len)
        if not 1 <= self.distance <= seq_len - 3:
            raise ValueError(f"data.copy_distance={distance} does not fit data.seq_len={seq_len}: need "
                             f"1 <= distance <= seq_len - 3 (0 picks {default_distance(seq_len)})")
        if alphabet < 2:
            raise ValueError(f"data.copy_alphabet={alphabet}: need at least 2 random token ids")
        if tokens not in COPY_TOKENS:
            raise ValueError(f"data.copy_tokens must be one of {COPY_TOKENS}, got {tokens!r}")
        self.alphabet = alphabet
        if tokens == "fresh":  # random ids follow the tokenizer's: never text
            self.ids = self.tokenizer.vocab_size + np.arange(alphabet)
        else:  # the tokenizer's own digits and letters: the copy skill on the tokens text tasks use
            text_ids = np.array(self.tokenizer.encode(TEXT_SYMBOLS), dtype=np.int64)
            if len(text_ids) != len(TEXT_SYMBOLS) or alphabet > len(text_ids):
                raise ValueError(f"data.copy_tokens=text draws from the {len(TEXT_SYMBOLS)} digits and letters, one "
                                 f"token each: need data.copy_alphabet <= {len(TEXT_SYMBOLS)} and a tokenizer that "
                                 f"encodes each as one token (the byte tokenizer does), got {alphabet}")
            self.ids = text_ids[:alphabet]
        self.vocab_size_needed = max(self.tokenizer.vocab_size, int(self.ids.max()) + 1)
        self.copy_len = min(self.distance, seq_len - self.distance - 2)
        self.curriculum = Curriculum(seq_len, curriculum_samples, min_doc_len, "copy")

    @classmethod
    def from_config(cls, data, tokenizer: Tokenizer) -> LongCopyDataset:
        """The dataset ``data=copy`` describes (a ``DataConfig``)."""
        return cls(seq_len=data.seq_len, seed=data.seed, tokenizer=tokenizer, distance=data.copy_distance,
                   alphabet=data.copy_alphabet, curriculum_samples=data.copy_curriculum_samples,
                   min_doc_len=data.copy_min_doc_len, tokens=data.copy_tokens)

    @property
    def chance(self) -> float:
        return 1.0 / self.alphabet

    def describe(self, accuracy: float) -> str:
        """The final line's metric: accuracy, its chance level and the distance it needs."""
        return (f"long-range copy accuracy {100 * accuracy:.1f}% (chance {100 * self.chance:.1f}%) "
                f"at {self.distance} tokens back")

    def doc_len(self, index: int) -> int:
        return self.curriculum.doc_len(index)

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        check_index(index)
        rng = sample_rng(self.seed, index)
        lengths = self.curriculum.lengths(index)
        if lengths == [self.seq_len]:
            tokens, is_copy = self._document(rng, self.seq_len, self.distance, self.copy_len)
        else:  # packed shorter documents, each with its own distance (no single offset fits them all)
            docs = [self._document(rng, n, d, min(d, n - d - 2))
                    for n, d in ((n, int(rng.integers(n // 4, default_distance(n) + 1))) for n in lengths)]
            tokens, is_copy = (np.concatenate(parts) for parts in zip(*docs))
        return answers_only_sample(tokens, is_copy, lengths)

    def _document(self, rng: np.random.Generator, length: int, distance: int, copy_len: int):
        """(tokens, is_copy) of one document: BOS, distance random tokens, their copy, filler, EOS."""
        unique = self.alphabet >= distance
        source = self.ids[rng.choice(self.alphabet, size=distance, replace=not unique)]
        tail = length - 1 - distance - copy_len  # random filler, then EOS
        filler = self.ids[rng.integers(0, self.alphabet, size=tail - 1)]
        tokens = np.concatenate([[self.tokenizer.bos_id], source, source[:copy_len], filler, [self.tokenizer.eos_id]])
        is_copy = np.zeros(length, dtype=bool)
        is_copy[1 + distance: 1 + distance + copy_len] = True
        return tokens, is_copy
