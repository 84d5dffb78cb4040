"""Datasets, packing, per-rank sharding and resumable state.

Every dataset maps a sample index to a dict of 1-D tensors of length seq_len
(keys in `SAMPLE_KEYS`, format in `lctrain.data.sample`) as a pure function of
(seed, index); `ShardedLoader` deals indices out to data-parallel ranks.
"""

from __future__ import annotations

from lctrain.data.loader import EVAL_INDEX_OFFSET, ShardedLoader, collate, eval_batches, rank_sample_indices
from lctrain.data.passkey import PasskeyDataset
from lctrain.data.sample import IGNORE_INDEX, SAMPLE_KEYS
from lctrain.data.text import TextDataset
from lctrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

DATASET_NAMES = ("passkey", "text")


def build_dataset(
    name: str, *, seq_len: int, seed: int, tokenizer: Tokenizer, **kwargs
) -> PasskeyDataset | TextDataset:
    """`passkey` kwargs: docs_per_seq, num_needles, key_digits; `text` kwargs: path, jsonl_key."""
    if name == "passkey":
        return PasskeyDataset(seq_len=seq_len, seed=seed, tokenizer=tokenizer, **kwargs)
    if name == "text":
        return TextDataset(seq_len=seq_len, seed=seed, tokenizer=tokenizer, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


__all__ = [
    "DATASET_NAMES",
    "EVAL_INDEX_OFFSET",
    "IGNORE_INDEX",
    "SAMPLE_KEYS",
    "ByteTokenizer",
    "HFTokenizer",
    "PasskeyDataset",
    "ShardedLoader",
    "TextDataset",
    "Tokenizer",
    "build_dataset",
    "build_tokenizer",
    "collate",
    "eval_batches",
    "rank_sample_indices",
]
