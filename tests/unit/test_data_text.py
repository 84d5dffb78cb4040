"""Text dataset over local .txt / .jsonl files, and the local tokenizer.json wrapper."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lctrain.config import DataConfig
from lctrain.data import SAMPLE_KEYS, ByteTokenizer, HFTokenizer, TextDataset, build_dataset, build_tokenizer

from tests.helpers.data import assert_sample_invariants

TOKENIZER = ByteTokenizer()
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


# Document n is one letter repeated; the lengths are distinct, so any piece of a
# document names it (by its letter, or by the position of its EOS).
LENGTHS = [3, 150, 7, 90, 20, 200, 11, 5, 40, 64, 13, 1]
LETTERS = "abcdefghijkl"


@pytest.fixture
def corpus(tmp_path):
    """Twelve documents in nested .txt files and a .jsonl file, plus files to skip."""
    (tmp_path / "sub").mkdir()
    documents = [letter * length for letter, length in zip(LETTERS, LENGTHS)]
    for n in range(6):
        (tmp_path / ("sub" if n % 2 else ".") / f"file{n}.txt").write_text(documents[n])
    lines = [json.dumps({"body": text, "id": n}) for n, text in enumerate(documents[6:])]
    (tmp_path / "sub" / "more.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("not data")
    return tmp_path, documents


def document_tokens(text: str) -> list[int]:
    return [TOKENIZER.bos_id, *TOKENIZER.encode(text), TOKENIZER.eos_id]


def test_text_dataset_partitions_an_epoch_into_document_pieces(corpus):
    root, documents = corpus
    seq_len = 64
    ds = TextDataset(str(root), seq_len=seq_len, seed=0, tokenizer=TOKENIZER, jsonl_key="body")
    assert ds.num_docs == 12  # the blank .txt is skipped, the .md ignored
    assert ds.num_tokens == sum(LENGTHS) + 2 * 12
    assert len(ds) == ds.num_tokens // seq_len
    covered = {n: set() for n in range(12)}  # positions of each document served this epoch
    bos_only_pieces = 0
    for index in range(len(ds)):
        sample = ds.sample(index)
        assert_sample_invariants(sample, seq_len)
        assert not sample["answer_mask"].any()
        for doc in range(int(sample["doc_ids"][-1]) + 1):
            in_doc = sample["doc_ids"] == doc
            ids, positions = sample["input_ids"][in_doc].tolist(), sample["position_ids"][in_doc].tolist()
            letters = set(TOKENIZER.decode(ids))
            if letters:
                (letter,) = letters
                n = LETTERS.index(letter)
            elif ids == [TOKENIZER.eos_id]:
                n = LENGTHS.index(positions[0] - 1)
            else:
                assert ids == [TOKENIZER.bos_id] and doc == int(sample["doc_ids"][-1])
                bos_only_pieces += 1
                continue
            # The piece is the document's tokens at the piece's real in-document positions.
            assert ids == document_tokens(documents[n])[positions[0] : positions[-1] + 1]
            assert not covered[n] & set(positions), "a token was served twice in one epoch"
            covered[n].update(positions)
    missing_bos = [n for n in range(12) if 0 not in covered[n] and covered[n]]
    assert len(missing_bos) == bos_only_pieces
    served = sum(len(c) for c in covered.values()) + bos_only_pieces
    assert served == len(ds) * seq_len and ds.num_tokens - served < seq_len  # only the tail is dropped


def test_text_position_ids_continue_split_documents(corpus):
    root, _ = corpus
    ds = TextDataset(str(root), seq_len=32, seed=1, tokenizer=TOKENIZER, jsonl_key="body")
    continued = [s for s in map(ds.sample, range(len(ds))) if s["position_ids"][0] > 0]
    assert continued, "long documents must be split across sequences"
    for sample in continued:
        assert sample["input_ids"][0] != TOKENIZER.bos_id


def test_text_is_deterministic_and_reshuffled_per_epoch(corpus):
    root, _ = corpus
    a = TextDataset(str(root), seq_len=48, seed=0, tokenizer=TOKENIZER, jsonl_key="body")
    b = TextDataset(str(root / "**" / "*"), seq_len=48, seed=0, tokenizer=TOKENIZER, jsonl_key="body")
    n = len(a)
    for index in (n + 3, 0, 5, 2 * n + 1):  # out of order: no hidden stream state
        assert all(torch.equal(a.sample(index)[k], b.sample(index)[k]) for k in SAMPLE_KEYS)

    def epoch_sequences(ds, epoch):
        return {tuple(ds.sample(epoch * n + i)["input_ids"].tolist()) for i in range(n)}

    # Different sets of sequences, not just another order: the documents were reshuffled.
    assert epoch_sequences(a, 0) != epoch_sequences(a, 1)
    other = TextDataset(str(root), seq_len=48, seed=9, tokenizer=TOKENIZER, jsonl_key="body")
    assert epoch_sequences(a, 0) != epoch_sequences(other, 0)


def test_text_single_file_and_default_key(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(json.dumps({"text": f"line {i} " * 5}) for i in range(10)))
    ds = build_dataset(DataConfig(name="text", seq_len=40, seed=0, path=str(file)), TOKENIZER)
    assert isinstance(ds, TextDataset) and ds.num_docs == 10
    assert_sample_invariants(ds.sample(3), 40)


@pytest.mark.parametrize("content, name, match", [
    (b"\x97binary\x00\xff", "bin.txt", r"bin.txt is not UTF-8 text"),
    (b"{\"text\": \"ok\"}\nnot json\n", "bad.jsonl", r"bad.jsonl:2 is not a JSON object"),
])
def test_unreadable_files_are_named(tmp_path, content, name, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        TextDataset(str(tmp_path), seq_len=8, seed=0, tokenizer=TOKENIZER)


def test_text_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=re.escape(missing)):
        TextDataset(missing, seq_len=8, seed=0, tokenizer=TOKENIZER)
    (tmp_path / "a.md").write_text("hello")
    no_files = f"no .txt or .jsonl files found under {re.escape(repr(str(tmp_path)))}"
    with pytest.raises(ValueError, match=no_files):
        TextDataset(str(tmp_path), seq_len=8, seed=0, tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        TextDataset(str(tmp_path / "*.txt"), seq_len=8, seed=0, tokenizer=TOKENIZER)
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="every document under .* is empty"):
        TextDataset(str(tmp_path), seq_len=8, seed=0, tokenizer=TOKENIZER)
    (tmp_path / "k.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"k.jsonl:1 has no key 'text'.*set jsonl_key"):
        TextDataset(str(tmp_path), seq_len=8, seed=0, tokenizer=TOKENIZER)
    (tmp_path / "k.jsonl").unlink()
    (tmp_path / "t.txt").write_text("tiny")
    with pytest.raises(ValueError, match="fewer than seq_len=100"):
        TextDataset(str(tmp_path), seq_len=100, seed=0, tokenizer=TOKENIZER)


@pytest.fixture
def tokenizer_json(tmp_path):
    """A word-level tokenizer.json trained in memory with BOS/EOS but no PAD token."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"])
    tokenizer.train_from_iterator([" ".join(WORDS), " ".join(reversed(WORDS))], trainer)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def test_hf_tokenizer_special_ids(tokenizer_json):
    tok = build_tokenizer("hf", tokenizer_json)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # the file's <s> and </s>
    assert tok.pad_id == tok.vocab_size - 1 == len(WORDS) + 3  # appended after the file's vocabulary
    ids = tok.encode("gamma alpha mu")
    assert len(ids) == 3 and tok.bos_id not in ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "gamma alpha mu"


def test_text_dataset_with_hf_tokenizer(tmp_path, tokenizer_json):
    data = tmp_path / "data"
    data.mkdir()
    for n in range(5):
        (data / f"{n}.txt").write_text(" ".join(WORDS[n:] + WORDS[:n]))
    tok = build_tokenizer("hf", tokenizer_json)
    ds = build_dataset(DataConfig(name="text", seq_len=10, seed=0, path=str(data)), tok)
    assert ds.num_tokens == 5 * (len(WORDS) + 2)
    for index in range(len(ds)):
        sample = ds.sample(index)
        assert_sample_invariants(sample, 10)
        assert int(sample["input_ids"].max()) < tok.vocab_size
        starts = sample["position_ids"] == 0
        assert torch.all(sample["input_ids"][starts] == tok.bos_id)
