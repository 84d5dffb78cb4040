"""Shared fixtures; test-only helpers live in tests/helpers/."""

import json
import os

import pytest

# Tests pin their own threads; keep spawned ranks from oversubscribing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CORPUS_WORDS = "the quick brown fox jumps over the lazy dog while long context models read on".split()


@pytest.fixture
def text_corpus(tmp_path):
    """A directory of local text files for ``data=text``: ``text_corpus(kind)`` writes 12
    documents as .txt files or as two .jsonl files (text under "body"), some in a subfolder."""
    def write(kind: str):
        corpus = tmp_path / f"corpus-{kind}"
        (corpus / "nested").mkdir(parents=True)
        n = len(CORPUS_WORDS)
        docs = [" ".join(CORPUS_WORDS[i % n:] + CORPUS_WORDS[:i % n]) * (3 + i) for i in range(12)]
        if kind == "txt":
            for i, text in enumerate(docs):
                (corpus / ("nested" if i % 2 else "") / f"doc{i}.txt").write_text(text)
        else:
            (corpus / "part0.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in docs[:7]))
            (corpus / "nested" / "part1.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in docs[7:]))
        return corpus
    return write
