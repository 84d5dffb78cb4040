"""Long-range recall: the built-in task of ``make train``, learnable in minutes on CPUs.

A document of n tokens is

    BOS, filler with k needles in its first half, ..., Q_a A_a Q_b A_b ... (k queries), EOS

There are ``classes`` = k kinds of needle. A needle of class c is one token, ``needle(c, v)``,
carrying a random value v out of ``values``; each document holds one needle of every class, at
random distinct positions in its first half, among random filler (byte tokens). The document
ends by asking every class once, in random order: the query token ``Q_c`` is followed by the
answer, the needle of class c that this document holds. The answers are the only targets
(``answer_mask``; every other label is ignored): the value is random per document, so the
only way to predict it is to attend from the query back to the needle, at least n/2 - 2k
tokens away (2016 at 4096 tokens). Chance is 1/values per answer.

Why this task: a query finds its needle by content (its class), one attention hop that a tiny
model learns in about a hundred steps on short documents and that keeps working as documents
grow, because nothing in it depends on the distance. Copying tasks that need a chain of two
heads (find the earlier occurrence, read its neighbour: ``data=copy``, passkey digits) or a
fixed offset need far more steps than 2 CPU cores give in minutes (measured in the README).

The curriculum (``curriculum_samples``) packs short documents first and grows them to seq_len
(``lctrain.data.curriculum``); held-out (eval) samples are always one full-length document.
Token ids: needles and queries follow the tokenizer's vocabulary (``vocab_size_needed``).
"""

from __future__ import annotations

import numpy as np
import torch

from lctrain.data.curriculum import Curriculum, answers_only_sample
from lctrain.data.sample import check_index, check_seed, sample_rng
from lctrain.data.tokenizer import ByteTokenizer, Tokenizer


class LongRecallDataset:
    """Deterministic, infinite stream of recall sequences; sample i is a function of (seed, i)."""

    def __init__(self, seq_len: int, seed: int, tokenizer: Tokenizer | None = None, classes: int = 16,
                 values: int = 64, curriculum_samples: int = 0, min_doc_len: int = 128):
        check_seed(seed)
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        if classes < 1 or values < 2:
            raise ValueError(f"data.recall_classes={classes} and data.recall_values={values}: need at least 1 "
                             f"class and 2 values")
        self.seq_len, self.seed, self.classes, self.values = seq_len, seed, classes, values
        self.curriculum = Curriculum(seq_len, curriculum_samples, min_doc_len, "recall")
        shortest = min(min_doc_len, seq_len) if curriculum_samples else seq_len
        if shortest < 4 * classes + 2:
            raise ValueError(f"a {shortest}-token document cannot hold {classes} needles and their queries: "
                             f"need data.recall_min_doc_len and data.seq_len >= {4 * classes + 2} (4 x "
                             f"data.recall_classes + 2)")
        self.needle_id = self.tokenizer.vocab_size  # needle(c, v) = needle_id + c * values + v
        self.query_id = self.needle_id + classes * values  # Q_c = query_id + c
        self.vocab_size_needed = self.query_id + classes
        self.distance = self.min_distance(seq_len)
        specials = {self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id}
        self._filler_ids = np.array([i for i in range(self.tokenizer.vocab_size) if i not in specials])

    @classmethod
    def from_config(cls, data, tokenizer: Tokenizer) -> LongRecallDataset:
        """The dataset ``data=recall`` describes (a ``DataConfig``)."""
        return cls(seq_len=data.seq_len, seed=data.seed, tokenizer=tokenizer, classes=data.recall_classes,
                   values=data.recall_values, curriculum_samples=data.recall_curriculum_samples,
                   min_doc_len=data.recall_min_doc_len)

    def min_distance(self, doc_len: int) -> int:
        """Fewest tokens between a query and its needle in a document of ``doc_len`` tokens."""
        return (doc_len - 1 - 2 * self.classes) - (doc_len // 2 - 1)

    @property
    def chance(self) -> float:
        return 1.0 / self.values

    def describe(self, accuracy: float) -> str:
        """The final line's metric: accuracy, its chance level and the distance it needs."""
        return (f"long-range recall accuracy {100 * accuracy:.1f}% (chance {100 * self.chance:.1f}%) "
                f"at >= {self.distance} tokens back")

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        check_index(index)
        rng = sample_rng(self.seed, index)
        lengths = self.curriculum.lengths(index)
        tokens, answers = (np.concatenate(parts) for parts in zip(*(self._document(rng, n) for n in lengths)))
        return answers_only_sample(tokens, answers, lengths)

    def _document(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, is_answer) of one document of n tokens."""
        k, tok = self.classes, self.tokenizer
        tokens = self._filler_ids[rng.integers(0, len(self._filler_ids), size=n)]
        tokens[0], tokens[-1] = tok.bos_id, tok.eos_id
        values = rng.integers(0, self.values, size=k)
        needles = self.needle_id + np.arange(k) * self.values + values
        tokens[1 + rng.choice(n // 2 - 1, size=k, replace=False)] = needles
        order = rng.permutation(k)
        queries = n - 1 - 2 * k + 2 * np.arange(k)
        tokens[queries] = self.query_id + order
        tokens[queries + 1] = needles[order]
        is_answer = np.zeros(n, dtype=bool)
        is_answer[queries + 1] = True
        return tokens, is_answer
