"""Tokenizers: a dependency-free byte tokenizer and a wrapper for a local tokenizer.json.

Both expose the same small interface (`Tokenizer`): `encode` returns ids without
special tokens (the datasets add BOS/EOS themselves), `decode` drops special ids.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

TOKENIZER_NAMES = ("byte", "hf")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS=256, EOS=257, PAD=258."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


# tokenizer.json records which tokens are special but not their role, so roles
# are recognised by the names the common model families use.
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "[CLS]")
_EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[EOS]", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class HFTokenizer:
    """A local Hugging Face `tokenizer.json`.

    BOS/EOS/PAD take the ids of the file's special tokens when it has them;
    any role it lacks gets a fresh id appended after the file's vocabulary, and
    `vocab_size` counts those appended ids so the embedding table covers them.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer

        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file not found: {path!r}; pass the path of a local tokenizer.json")
        self.path = path
        self._tokenizer = _HFTokenizer.from_file(path)
        self._file_vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}
        next_id = self._file_vocab_size
        ids = []
        for names in (_BOS_NAMES, _EOS_NAMES, _PAD_NAMES):
            found = next((n for n in names if n in special), None)
            if found is None:
                ids.append(next_id)
                next_id += 1
            else:
                ids.append(self._tokenizer.token_to_id(found))
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = next_id
        self._special_ids = set(ids)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        # Appended ids are unknown to the file's tokenizer, so drop them here.
        kept = [int(i) for i in ids if int(i) < self._file_vocab_size and int(i) not in self._special_ids]
        return self._tokenizer.decode(kept, skip_special_tokens=True)


def build_tokenizer(name: str = "byte", path: str | None = None) -> ByteTokenizer | HFTokenizer:
    """`name="byte"` needs no file; `name="hf"` loads the tokenizer.json at `path`."""
    if name == "byte":
        return ByteTokenizer()
    if name == "hf":
        if path is None:
            raise ValueError("tokenizer 'hf' needs path=<local tokenizer.json>")
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}")
