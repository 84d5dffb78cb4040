"""The long-range copy task: deterministic, resumable samples, the curriculum, and the eval metric
(an oracle scores 100%, a constant predictor scores chance) through the real Evaluator."""

from __future__ import annotations

import torch

from lctrain.data import LongCopyDataset
from lctrain.data.copy import default_distance
from lctrain.data.sample import IGNORE_INDEX
from lctrain.data.tokenizer import ByteTokenizer
from tests.helpers.data import assert_pure_and_resumable, assert_sample_invariants, eval_with_predictor


def test_every_copy_token_is_the_token_distance_back_and_the_only_target():
    ds = LongCopyDataset(4096, seed=3)
    assert ds.distance == 2047 == default_distance(4096) and ds.distance % 2 == 1
    s = ds.sample(5)
    assert_sample_invariants(s, 4096, answers_only=True)
    targets = s["answer_mask"].nonzero().flatten()
    assert len(targets) == 2047 and torch.equal(s["labels"] != IGNORE_INDEX, s["answer_mask"])
    ids = s["input_ids"]
    assert torch.equal(s["labels"][targets], ids[targets + 1 - ds.distance])
    source = ids[1:1 + ds.distance]
    assert len(set(source.tolist())) == ds.distance  # unique: the copy needs a lookup, not a guess
    assert int(source.min()) >= ByteTokenizer().vocab_size and ds.vocab_size_needed == 259 + 4096


def test_samples_are_pure_functions_of_seed_and_index_so_resume_is_exact():
    assert_pure_and_resumable(lambda seed: LongCopyDataset(1024, seed=seed, curriculum_samples=40))


def test_curriculum_holds_short_documents_then_grows_to_full_length():
    ds = LongCopyDataset(4096, seed=0, curriculum_samples=200, min_doc_len=256)
    lengths = [ds.doc_len(i) for i in (0, 99, 100, 150, 199, 200, 2**40)]
    assert lengths[:3] == [256, 256, 256] and 256 < lengths[3] < 4096 and lengths[5:] == [4096, 4096]
    packed = ds.sample(10)
    assert int(packed["doc_ids"].max()) == 15
    assert_sample_invariants(packed, 4096, answers_only=True)
    # Each short document repeats its own source at its own distance (so no single offset fits).
    distances = set()
    for doc in range(16):
        ids, mask = packed["input_ids"][packed["doc_ids"] == doc], packed["answer_mask"][packed["doc_ids"] == doc]
        first, count = int(mask.nonzero()[0]), int(mask.sum())
        distance = first  # the source starts after BOS; the first target is the copy's second token
        assert 256 // 4 <= distance <= 127 and count == min(distance, 256 - distance - 2)
        assert torch.equal(ids[first + 1:first + 1 + count], ids[first + 1 - distance:first + 1 - distance + count])
        distances.add(distance)
    assert len(distances) > 4


def test_an_oracle_scores_100_percent_and_a_constant_predictor_scores_chance():
    oracle = eval_with_predictor("copy", lambda labels: labels)
    assert oracle["eval/answer_acc"] == 1.0 and oracle["eval/answer_exact"] == 1.0
    constant = eval_with_predictor("copy", lambda labels: torch.full_like(labels, 259 + 17))
    assert constant["eval/answer_acc"] <= 8 / (8 * 255)  # each unique source holds the token at most once
    assert constant["eval/answer_chance"] == 1 / 4096 and constant["eval/answer_exact"] == 0.0


def test_text_tokens_copy_digits_and_letters_and_bad_alphabets_are_refused():
    import pytest

    from lctrain.data.copy import TEXT_SYMBOLS

    ds = LongCopyDataset(512, seed=1, alphabet=62, curriculum_samples=100, min_doc_len=32, tokens="text")
    s = ds.sample(3)
    assert_sample_invariants(s, 512, answers_only=True)
    text = set(ByteTokenizer().encode(TEXT_SYMBOLS))
    body = s["input_ids"][(s["input_ids"] != ByteTokenizer.bos_id) & (s["input_ids"] != ByteTokenizer.eos_id)]
    assert set(body.tolist()) <= text and ds.vocab_size_needed == 259
    assert_pure_and_resumable(lambda seed: LongCopyDataset(512, seed=seed, alphabet=62, curriculum_samples=40,
                                                           min_doc_len=32, tokens="text"))
    with pytest.raises(ValueError, match="copy_alphabet <= 62"):
        LongCopyDataset(512, seed=1, alphabet=100, tokens="text")
    with pytest.raises(ValueError, match="copy_tokens must be one of"):
        LongCopyDataset(512, seed=1, tokens="bytes")
