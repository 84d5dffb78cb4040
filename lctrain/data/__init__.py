"""Datasets, packing, per-rank sharding and resumable state.

Every dataset maps a sample index to a dict of 1-D tensors of length seq_len
(keys in `SAMPLE_KEYS`, format in `lctrain.data.sample`) as a pure function of
(seed, index); `ShardedLoader` deals indices out to data-parallel ranks.
"""

from __future__ import annotations

from lctrain.data.copy import LongCopyDataset
from lctrain.data.loader import EVAL_INDEX_OFFSET, ShardedLoader, collate, eval_batches, rank_sample_indices
from lctrain.data.passkey import PasskeyDataset
from lctrain.data.recall import LongRecallDataset
from lctrain.data.sample import IGNORE_INDEX, SAMPLE_KEYS
from lctrain.data.text import TextDataset
from lctrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

DATASETS = {"copy": LongCopyDataset, "passkey": PasskeyDataset, "recall": LongRecallDataset, "text": TextDataset}


def build_dataset(data, tokenizer: Tokenizer) -> PasskeyDataset | TextDataset:
    """The dataset a ``DataConfig`` describes (``data.name`` picks it; each dataset class maps the
    config fields onto its own constructor in ``from_config``)."""
    if data.name not in DATASETS:
        raise ValueError(f"unknown dataset {data.name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[data.name].from_config(data, tokenizer)


__all__ = [
    "DATASETS",
    "EVAL_INDEX_OFFSET",
    "IGNORE_INDEX",
    "SAMPLE_KEYS",
    "ByteTokenizer",
    "HFTokenizer",
    "LongCopyDataset",
    "LongRecallDataset",
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
