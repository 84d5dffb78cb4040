"""Passkey retrieval: a built-in long-context task that needs attention far back.

A document is

    BOS, filler ..., needle 1, filler ..., needle k, filler ..., questions, EOS

The filler repeats a few digit-free sentences, so the only digits a document
holds are the keys (and the needle numbers). Each needle hides a random key of
`key_digits` digits at a uniformly random depth:

    " The pass key is 48213. Remember it. 48213 is the pass key."

and the document ends by asking for every key, in shuffled order:

    " What is the pass key? The pass key is 48213."

With `num_needles > 1` the keys are distinct and numbered ("The pass key
number 2 is 71234."), giving more retrieval signal per sequence. The answer
digits after the last question are the tokens a model can only predict by
attending back to the needle; `answer_mask` marks them (on their label
positions). Keys may start with 0, so every answer digit is uniform over ten
values: chance level is 10% per digit, (1/10)**key_digits per whole key.

A training sequence packs `docs_per_seq` documents whose lengths are a random
split of seq_len (each at least `min_doc_len`), so no padding is needed.
Sample i depends only on (seed, i), so any sample can be regenerated alone.
"""

from __future__ import annotations

import numpy as np
import torch

from lctrain.data.sample import build_sample, check_index, check_seed, sample_rng
from lctrain.data.tokenizer import ByteTokenizer, Tokenizer

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
assert not any(c.isdigit() for c in FILLER)

MAX_KEY_DIGITS = 18  # keys are drawn as int64
FILLERS = ("sentences", "words")
# filler="words": each document draws its own small vocabulary of random words
# and strings them together at random. A word's later occurrences can only be
# completed by copying its earlier one, so every document teaches the copy
# ("induction") circuit that retrieval needs thousands of times, instead of the
# handful of times its keys do.
WORD_LETTERS = 4


def _texts(number: int | None) -> dict[str, str]:
    """The fixed text around the key of needle `number` (None: the only needle)."""
    name = "the pass key" if number is None else f"the pass key number {number}"
    asked = "the pass key" if number is None else f"pass key number {number}"
    return {
        "needle_before_key": f" {name.capitalize()} is ",
        "needle_between_keys": ". Remember it. ",
        "needle_after_key": f" is {name}.",
        "question_before_key": f" What is {asked}? {name.capitalize()} is ",
        "question_after_key": ".",
    }


class PasskeyDataset:
    """Deterministic, infinite stream of packed passkey sequences (no `__len__`)."""

    def __init__(
        self,
        seq_len: int,
        seed: int,
        tokenizer: Tokenizer | None = None,
        docs_per_seq: int = 1,
        num_needles: int = 1,
        key_digits: int = 5,
        filler: str = "sentences",
    ):
        check_seed(seed)
        if docs_per_seq < 1:
            raise ValueError(f"docs_per_seq must be >= 1, got {docs_per_seq}")
        if num_needles < 1:
            raise ValueError(f"num_needles must be >= 1, got {num_needles}")
        if not 1 <= key_digits <= MAX_KEY_DIGITS:
            raise ValueError(f"key_digits must be in 1..{MAX_KEY_DIGITS}, got {key_digits}")
        if filler not in FILLERS:
            raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
        if num_needles > 10**key_digits:
            raise ValueError(
                f"{num_needles} distinct keys do not exist with key_digits={key_digits}; raise key_digits"
            )
        self.seq_len = seq_len
        self.seed = seed
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.docs_per_seq = docs_per_seq
        self.num_needles = num_needles
        self.key_digits = key_digits
        self.filler = filler

        self._digit_ids = np.array([self._encode_digit(str(d)) for d in range(10)], dtype=np.int64)
        self._filler = self._encode(FILLER)
        numbers = [None] if num_needles == 1 else list(range(1, num_needles + 1))
        texts = [_texts(n) for n in numbers]
        self._parts = [{k: self._encode(v) for k, v in t.items()} for t in texts]
        # Word letters share nothing with the needle and question texts, so no
        # filler stretch can look like (part of) a question.
        used = {c for t in texts for v in t.values() for c in v.lower()}
        letters = sorted(set("abcdefghijklmnopqrstuvwxyz") - used)
        letters += [c.upper() for c in letters]
        self._letter_ids = self._encode("".join(letters))
        self._space_id = self._encode(" ")[0]
        # BOS + EOS + every fixed part + each key three times (twice in its needle, once answered).
        fixed_len = sum(len(p) for parts in self._parts for p in parts.values())
        self.min_doc_len = 2 + fixed_len + 3 * key_digits * num_needles
        min_seq_len = docs_per_seq * self.min_doc_len
        if seq_len < min_seq_len:
            raise ValueError(
                f"seq_len={seq_len} is too short for {docs_per_seq} passkey document(s) with "
                f"num_needles={num_needles}, key_digits={key_digits}: the minimum is {min_seq_len}; "
                "raise seq_len or lower docs_per_seq / num_needles"
            )

    @classmethod
    def from_config(cls, data, tokenizer: Tokenizer) -> PasskeyDataset:
        """The dataset ``data=passkey`` describes (a ``DataConfig``)."""
        return cls(seq_len=data.seq_len, seed=data.seed, tokenizer=tokenizer, docs_per_seq=data.docs_per_seq,
                   num_needles=data.num_needles, key_digits=data.key_digits, filler=data.filler)

    chance = 0.1  # per answer digit

    def describe(self, accuracy: float) -> str:
        """The final line's metric: per-digit accuracy of the answers and its chance level."""
        return f"passkey digit accuracy {100 * accuracy:.1f}% (chance 10.0%)"

    def _encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text), dtype=np.int64)

    def _encode_digit(self, digit: str) -> int:
        ids = self.tokenizer.encode(digit)
        if len(ids) != 1:
            raise ValueError(
                f"passkey needs every digit to be one token, but the tokenizer encodes {digit!r} as {ids}; "
                "use the byte tokenizer"
            )
        return ids[0]

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        check_index(index)
        rng = sample_rng(self.seed, index)
        doc_lens = self._split_lengths(rng)
        docs = [self._document(rng, n) for n in doc_lens]
        tokens = np.concatenate([tokens for tokens, _ in docs])
        answer_token_mask = np.concatenate([mask for _, mask in docs])
        doc_ids = np.repeat(np.arange(len(doc_lens)), doc_lens)
        doc_starts = np.cumsum(doc_lens) - doc_lens
        position_ids = np.arange(self.seq_len) - np.repeat(doc_starts, doc_lens)
        return build_sample(tokens, doc_ids, position_ids, answer_token_mask)

    def _split_lengths(self, rng: np.random.Generator) -> np.ndarray:
        """Document lengths: a uniformly random split of seq_len, each >= min_doc_len."""
        spare = self.seq_len - self.docs_per_seq * self.min_doc_len
        cuts = np.sort(rng.integers(0, spare + 1, size=self.docs_per_seq - 1))
        extra = np.diff(np.concatenate([[0], cuts, [spare]]))
        return self.min_doc_len + extra

    def _sentences(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """The fixed sentences repeated from a random phase."""
        phase = rng.integers(len(self._filler))
        num_repeats = -(-(phase + length) // len(self._filler))
        return np.tile(self._filler, num_repeats)[phase : phase + length]

    def _words(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """Random words of this document's own vocabulary, space separated.

        The vocabulary splits a random permutation of the filler letters into
        words, so each letter occurs in exactly one word at one place: after a
        word's first letter, the rest is a one-token copy of an earlier
        occurrence (the simplest induction pattern, which tiny models pick up
        fast); the next word is a fresh random choice.
        """
        num_words = len(self._letter_ids) // WORD_LETTERS
        letters = rng.permutation(self._letter_ids)[: num_words * WORD_LETTERS]
        vocab = np.concatenate(
            [letters.reshape(num_words, WORD_LETTERS), np.full((num_words, 1), self._space_id)], axis=1
        )
        words = rng.integers(num_words, size=-(-length // (WORD_LETTERS + 1)))
        return vocab[words].reshape(-1)[:length]

    def _document(self, rng: np.random.Generator, doc_len: int) -> tuple[np.ndarray, np.ndarray]:
        """One document of exactly doc_len tokens and the mask of its answer digits."""
        num_needles, num_digits = self.num_needles, self.key_digits
        keys = rng.choice(10**num_digits, size=num_needles, replace=False)
        key_digits = keys[:, None] // 10 ** np.arange(num_digits - 1, -1, -1) % 10
        key_tokens = self._digit_ids[key_digits]  # (num_needles, num_digits)

        # One continuous stretch of filler, cut at the needle depths.
        filler_len = doc_len - self.min_doc_len
        filler = self._words(rng, filler_len) if self.filler == "words" else self._sentences(rng, filler_len)
        depths = np.sort(rng.integers(0, filler_len + 1, size=num_needles))
        filler_pieces = np.split(filler, depths)

        # (tokens, is_answer) pieces; needles are numbered in order of depth.
        bos = np.array([self.tokenizer.bos_id])
        pieces = [(bos, False), (filler_pieces[0], False)]
        for needle, parts in enumerate(self._parts):
            key = key_tokens[needle]
            pieces += [
                (parts["needle_before_key"], False),
                (key, False),
                (parts["needle_between_keys"], False),
                (key, False),
                (parts["needle_after_key"], False),
                (filler_pieces[needle + 1], False),
            ]
        for needle in rng.permutation(num_needles):
            parts = self._parts[needle]
            pieces += [
                (parts["question_before_key"], False),
                (key_tokens[needle], True),
                (parts["question_after_key"], False),
            ]
        pieces.append((np.array([self.tokenizer.eos_id]), False))

        tokens = np.concatenate([p for p, _ in pieces])
        is_answer = np.repeat([flag for _, flag in pieces], [len(p) for p, _ in pieces])
        assert len(tokens) == doc_len
        return tokens, is_answer
