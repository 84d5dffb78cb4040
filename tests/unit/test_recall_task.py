"""The long-range recall task (make train's): every answer is its class's needle, far back;
samples are pure functions of (seed, index); the curriculum; the metric through the real
Evaluator (an oracle scores 100%, a constant predictor scores chance)."""

from __future__ import annotations

import pytest
import torch

from lctrain.data import LongRecallDataset
from lctrain.data.tokenizer import ByteTokenizer
from tests.helpers.data import assert_pure_and_resumable, assert_sample_invariants, eval_with_predictor


def _check_documents(ds: LongRecallDataset, sample: dict) -> list[int]:
    """Each document's answers are the needles of the asked classes; returns the distances."""
    distances = []
    for doc in sample["doc_ids"].unique().tolist():
        sel = sample["doc_ids"] == doc
        ids, answers = sample["input_ids"][sel], sample["answer_mask"][sel]
        n = len(ids)
        needles = ((ids >= ds.needle_id) & (ids < ds.query_id)).nonzero().flatten()
        first_half = needles[needles < n // 2]
        assert len(first_half) == ds.classes  # one needle per class, in the first half
        by_class = {int(ids[p] - ds.needle_id) // ds.values: int(p) for p in first_half}
        assert sorted(by_class) == list(range(ds.classes))
        queries = answers.nonzero().flatten()  # label positions: the query tokens
        assert len(queries) == ds.classes
        for q in queries.tolist():
            cls = int(ids[q]) - ds.query_id
            assert sample["labels"][sel][q] == ids[by_class[cls]]  # the answer is that class's needle
            distances.append(q - by_class[cls])
        assert min(distances[-ds.classes:]) >= ds.min_distance(n)
    return distances


def test_every_answer_is_the_needle_of_its_class_at_least_half_a_document_back():
    ds = LongRecallDataset(4096, seed=3)
    assert ds.distance == 2016 and ds.chance == 1 / 64 and ds.vocab_size_needed == 259 + 16 * 65
    for index in (0, 1, 2**40):
        s = ds.sample(index)
        assert_sample_invariants(s, 4096, answers_only=True)
        assert min(_check_documents(ds, s)) >= 2016
        assert int(s["answer_mask"].sum()) == 16
        filler = s["input_ids"][(s["input_ids"] < 256)]
        assert len(filler.unique()) > 200  # random byte filler, no specials inside documents


def test_samples_are_pure_functions_of_seed_and_index_so_resume_is_exact():
    assert_pure_and_resumable(lambda seed: LongRecallDataset(1024, seed=seed, curriculum_samples=40))


def test_curriculum_packs_short_documents_then_grows_to_one_full_length_document():
    ds = LongRecallDataset(4096, seed=0, curriculum_samples=200, min_doc_len=128)
    short, growing, full = ds.sample(0), ds.sample(150), ds.sample(200)
    assert int(short["doc_ids"].max()) == 31 and int(short["answer_mask"].sum()) == 32 * 16
    assert 0 < int(growing["doc_ids"].max()) < 31 and int(full["doc_ids"].max()) == 0
    for s in (short, growing, full):
        assert_sample_invariants(s, 4096, answers_only=True)
        _check_documents(ds, s)


def test_bad_sizes_name_the_fix():
    with pytest.raises(ValueError, match="recall_min_doc_len"):
        LongRecallDataset(4096, seed=0, classes=64, curriculum_samples=10, min_doc_len=128)
    with pytest.raises(ValueError, match="recall_values"):
        LongRecallDataset(4096, seed=0, values=1)
    assert LongRecallDataset(512, 0, ByteTokenizer()).describe(0.5) == (
        "long-range recall accuracy 50.0% (chance 1.6%) at >= 224 tokens back")


def test_an_oracle_scores_100_percent_and_a_constant_predictor_scores_chance():
    oracle = eval_with_predictor("recall", lambda labels: labels)
    assert oracle["eval/answer_acc"] == 1.0 and oracle["eval/answer_exact"] == 1.0
    # Always the value-0 needle of its class would be chance; a fixed token is right at most
    # once per document (one class holds it).
    constant = eval_with_predictor("recall", lambda labels: torch.full_like(labels, 259 + 17))
    assert constant["eval/answer_acc"] <= 1 / 16 and constant["eval/answer_chance"] == 1 / 64
    guess = eval_with_predictor("recall", lambda labels: torch.where(labels >= 259, 259 + (labels - 259) // 64 * 64,
                                                                     labels))
    assert abs(guess["eval/answer_acc"] - 1 / 64) < 0.03  # value 0 of the right class: chance
