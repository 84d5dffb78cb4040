"""Plain text from local files, tokenised, shuffled per epoch and cut into sequences.

Sources: a `.txt` file is one document; a `.jsonl` file holds one document per
line, its text under `jsonl_key`. `path` may be one file, a directory (searched
recursively) or a glob; files are taken in sorted order so every rank and every
restart sees the same corpus.

Every document becomes BOS + tokens + EOS. An epoch concatenates the documents
in an order shuffled from (seed, epoch) and cuts the stream into
`sequences_per_epoch` sequences of seq_len tokens (the tail shorter than
seq_len is dropped, a different one each epoch). Documents may be split at a
sequence boundary; each piece keeps its real in-document positions. The
sequences of an epoch are served in a shuffled order too, so the pieces of a
long document do not land side by side in one batch. Sample i is a pure
function of (seed, i), with epoch = i // sequences_per_epoch.

The whole tokenised corpus is held in memory (int32).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch

from lctrain.data.sample import build_sample, check_index, check_seed
from lctrain.data.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl")


def find_text_files(path: str) -> list[str]:
    """The sorted `.txt`/`.jsonl` files that `path` (file, directory or glob) names."""
    if os.path.isfile(path):
        if not path.endswith(TEXT_SUFFIXES):
            raise ValueError(f"{path!r} is neither .txt nor .jsonl; point the text dataset at such files")
        return [path]
    if os.path.isdir(path):
        candidates = glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True)
    elif glob.has_magic(path):
        candidates = glob.glob(path, recursive=True)
    else:
        raise ValueError(f"text data path {path!r} does not exist; pass a file, a directory or a glob")
    files = sorted(f for f in candidates if os.path.isfile(f) and f.endswith(TEXT_SUFFIXES))
    if not files:
        raise ValueError(f"no .txt or .jsonl files found under {path!r}")
    return files


def read_documents(file: str, jsonl_key: str = "text") -> list[str]:
    """The documents of one file: the whole `.txt`, or each `.jsonl` line's `jsonl_key`.
    ValueError naming the file (and line) when it is not UTF-8 text or not JSON lines."""
    try:
        with open(file, encoding="utf-8") as f:
            if file.endswith(".txt"):
                return [f.read()]
            return _jsonl_documents(f, file, jsonl_key)
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); the text dataset reads "
                         f"UTF-8 .txt / .jsonl files: convert or remove it") from None


def _jsonl_documents(f, file: str, jsonl_key: str) -> list[str]:
    documents = []
    for line_number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{line_number} is not a JSON object ({err.msg}); a .jsonl file holds one "
                             f"JSON object per line") from None
        if not isinstance(record, dict) or jsonl_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{file}:{line_number} has no key {jsonl_key!r} (keys: {keys}); set jsonl_key (data.jsonl_key)")
        documents.append(record[jsonl_key])
    return documents


class TextDataset:
    """Sequences of seq_len tokens cut from a shuffled stream of local documents."""

    def __init__(self, path: str, seq_len: int, seed: int, tokenizer: Tokenizer, jsonl_key: str = "text"):
        check_seed(seed)
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.seq_len = seq_len
        self.seed = seed
        self.tokenizer = tokenizer

        documents = [
            np.array([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], dtype=np.int32)
            for file in find_text_files(path)
            for text in read_documents(file, jsonl_key)
            if text.strip()
        ]
        if not documents:
            raise ValueError(f"every document under {path!r} is empty; nothing to train on")
        self._tokens = np.concatenate(documents)
        self._doc_lens = np.array([len(d) for d in documents], dtype=np.int64)
        self._doc_starts = np.cumsum(self._doc_lens) - self._doc_lens
        self.num_docs = len(documents)
        self.num_tokens = len(self._tokens)
        self.sequences_per_epoch = self.num_tokens // seq_len
        if self.sequences_per_epoch == 0:
            raise ValueError(
                f"{path!r} holds {self.num_tokens} tokens, fewer than seq_len={seq_len}; "
                "add data or lower seq_len"
            )
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_config(cls, data, tokenizer: Tokenizer) -> TextDataset:
        """The dataset ``data=text`` describes (a ``DataConfig``)."""
        return cls(path=data.path, seq_len=data.seq_len, seed=data.seed, tokenizer=tokenizer,
                   jsonl_key=data.jsonl_key)

    def __len__(self) -> int:
        """Sequences in one epoch; any index >= 0 is valid (later epochs)."""
        return self.sequences_per_epoch

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, end offset of each document in the stream, sequence order) of an epoch."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            doc_order = rng.permutation(self.num_docs)
            doc_ends = np.cumsum(self._doc_lens[doc_order])
            sequence_order = rng.permutation(self.sequences_per_epoch)
            self._epoch_cache = (epoch, doc_order, doc_ends, sequence_order)
        return self._epoch_cache[1:]

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        check_index(index)
        epoch, index_in_epoch = divmod(index, self.sequences_per_epoch)
        doc_order, doc_ends, sequence_order = self._epoch(epoch)
        start = int(sequence_order[index_in_epoch]) * self.seq_len
        end = start + self.seq_len

        # The documents of the stream that overlap [start, end), and the piece of each.
        first, last = np.searchsorted(doc_ends, [start, end - 1], side="right")
        stream_doc = np.arange(first, last + 1)
        doc_stream_starts = doc_ends[stream_doc] - self._doc_lens[doc_order[stream_doc]]
        piece_begin = np.maximum(start, doc_stream_starts) - doc_stream_starts  # in-document offsets
        piece_end = np.minimum(end, doc_ends[stream_doc]) - doc_stream_starts
        piece_lens = piece_end - piece_begin
        assert piece_lens.sum() == self.seq_len and np.all(piece_lens > 0)

        piece_starts = np.cumsum(piece_lens) - piece_lens
        doc_ids = np.repeat(np.arange(len(stream_doc)), piece_lens)
        position_ids = np.arange(self.seq_len) - np.repeat(piece_starts - piece_begin, piece_lens)
        source = np.repeat(self._doc_starts[doc_order[stream_doc]], piece_lens) + position_ids
        return build_sample(self._tokens[source], doc_ids, position_ids)
