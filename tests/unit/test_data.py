"""Passkey dataset, sample invariants, sharded loader and builders."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lctrain.data import (
    EVAL_INDEX_OFFSET,
    SAMPLE_KEYS,
    ByteTokenizer,
    PasskeyDataset,
    ShardedLoader,
    build_dataset,
    build_tokenizer,
    eval_batches,
)

TOKENIZER = ByteTokenizer()
from tests.helpers.data import assert_sample_invariants


def decode_answers(sample: dict[str, torch.Tensor]) -> str:
    return TOKENIZER.decode(sample["labels"][sample["answer_mask"]].tolist())


# --- tokenizer ---------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_specials():
    tok = build_tokenizer("byte")
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.vocab_size == 259
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.decode([0xFF]) == "\ufffd"


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="byte, hf"):
        build_tokenizer("gpt9")
    with pytest.raises(ValueError, match="needs path"):
        build_tokenizer("hf")
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=re.escape(missing)):
        build_tokenizer("hf", missing)


# --- passkey -----------------------------------------------------------------


def test_passkey_is_deterministic_per_seed_and_index():
    a = PasskeyDataset(seq_len=2048, seed=3)
    b = PasskeyDataset(seq_len=2048, seed=3)
    for index in (0, 7, 2**40 + 5):
        sa, sb = a.sample(index), b.sample(index)
        assert all(torch.equal(sa[k], sb[k]) for k in SAMPLE_KEYS)
    # Out of order access gives the same sample: no hidden stream state.
    assert torch.equal(a.sample(7)["input_ids"], b.sample(7)["input_ids"])
    other_seed = PasskeyDataset(seq_len=2048, seed=4).sample(0)
    assert not torch.equal(a.sample(0)["input_ids"], other_seed["input_ids"])
    assert not torch.equal(a.sample(0)["input_ids"], a.sample(1)["input_ids"])


def test_passkey_single_document_layout():
    ds = PasskeyDataset(seq_len=1024, seed=0)
    sample = ds.sample(0)
    assert_sample_invariants(sample, 1024)
    ids = sample["input_ids"]
    assert ids[0] == TOKENIZER.bos_id and ids[-1] == TOKENIZER.eos_id
    assert torch.all(sample["doc_ids"] == 0)
    assert torch.equal(sample["position_ids"], torch.arange(1024))
    text = TOKENIZER.decode(ids.tolist())
    (key,) = re.findall(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", text)
    assert text.endswith(f" What is the pass key? The pass key is {key}.")
    assert decode_answers(sample) == key
    # The mask sits on the label positions of exactly the five final key digits.
    masked = sample["answer_mask"].nonzero().flatten()
    assert torch.equal(masked, torch.arange(1024 - 8, 1024 - 3))
    # Filler holds no digits: the key occurs exactly three times.
    assert len(re.findall(r"\d", text)) == 15


def test_passkey_multiple_needles_are_distinct_and_all_asked():
    ds = PasskeyDataset(seq_len=4096, seed=1, num_needles=4, key_digits=6)
    for index in range(5):
        sample = ds.sample(index)
        assert_sample_invariants(sample, 4096)
        text = TOKENIZER.decode(sample["input_ids"].tolist())
        needles = dict(re.findall(r"The pass key number (\d) is (\d{6})\. Remember it\.", text))
        assert sorted(needles) == ["1", "2", "3", "4"]
        assert len(set(needles.values())) == 4
        asked = re.findall(r"What is pass key number (\d)\? The pass key number \1 is (\d{6})\.", text)
        assert sorted(n for n, _ in asked) == ["1", "2", "3", "4"]
        assert all(needles[n] == key for n, key in asked)
        assert decode_answers(sample) == "".join(key for _, key in asked)


def test_passkey_question_order_is_shuffled():
    ds = PasskeyDataset(seq_len=2048, seed=0, num_needles=3)
    orders = set()
    for index in range(20):
        text = TOKENIZER.decode(ds.sample(index)["input_ids"].tolist())
        orders.add(tuple(re.findall(r"What is pass key number (\d)", text)))
    assert len(orders) > 1


def test_passkey_needle_depth_spreads_over_the_document():
    seq_len = 2048
    ds = PasskeyDataset(seq_len=seq_len, seed=0)
    depths = []
    for index in range(200):
        text = TOKENIZER.decode(ds.sample(index)["input_ids"].tolist())
        depths.append(text.index(" The pass key is") / seq_len)
    counts, _ = np.histogram(depths, bins=5, range=(0, 1))
    assert np.all(counts >= 15), counts  # ~uniform: 40 expected per bin (bins hold filler only up to ~0.9)


@pytest.mark.parametrize("docs_per_seq", [2, 5])
def test_passkey_packs_documents(docs_per_seq):
    ds = PasskeyDataset(seq_len=3000, seed=2, docs_per_seq=docs_per_seq)
    lengths = set()
    for index in range(4):
        sample = ds.sample(index)
        assert_sample_invariants(sample, 3000)
        doc = sample["doc_ids"]
        assert doc[-1] == docs_per_seq - 1
        starts = torch.nonzero(sample["position_ids"] == 0).flatten()
        assert torch.equal(starts, torch.nonzero(torch.diff(doc, prepend=torch.tensor([-1]))).flatten())
        assert torch.all(sample["input_ids"][starts] == TOKENIZER.bos_id)
        lengths.update(torch.bincount(doc).tolist())
        assert min(torch.bincount(doc).tolist()) >= ds.min_doc_len
        text = TOKENIZER.decode(sample["input_ids"].tolist())
        keys = re.findall(r"The pass key is (\d{5})\. Remember", text)
        assert decode_answers(sample) == "".join(keys)
    assert len(lengths) > docs_per_seq  # lengths are drawn, not fixed


@settings(max_examples=25, deadline=None)
@given(
    seq_len=st.integers(min_value=1, max_value=3000),
    docs_per_seq=st.integers(min_value=1, max_value=4),
    num_needles=st.integers(min_value=1, max_value=3),
    key_digits=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=2**32),
    index=st.integers(min_value=0, max_value=2**45),
)
def test_passkey_invariants_hold_for_any_shape(seq_len, docs_per_seq, num_needles, key_digits, seed, index):
    kwargs = dict(docs_per_seq=docs_per_seq, num_needles=num_needles, key_digits=key_digits)
    try:
        ds = PasskeyDataset(seq_len=seq_len, seed=seed, **kwargs)
    except ValueError as error:
        minimum = int(re.search(r"minimum is (\d+)", str(error)).group(1))
        assert seq_len < minimum
        return
    sample = ds.sample(index)
    assert_sample_invariants(sample, seq_len)
    assert sample["doc_ids"][-1] == docs_per_seq - 1
    assert int(sample["answer_mask"].sum()) == docs_per_seq * num_needles * key_digits


def test_passkey_minimum_length_is_exact():
    ds = PasskeyDataset(seq_len=1000, seed=0, docs_per_seq=2, num_needles=2)
    minimum = 2 * ds.min_doc_len
    smallest = PasskeyDataset(seq_len=minimum, seed=0, docs_per_seq=2, num_needles=2)
    assert_sample_invariants(smallest.sample(0), minimum)
    with pytest.raises(ValueError, match=f"minimum is {minimum}"):
        PasskeyDataset(seq_len=minimum - 1, seed=0, docs_per_seq=2, num_needles=2)


def test_passkey_argument_errors():
    with pytest.raises(ValueError, match="num_needles"):
        PasskeyDataset(seq_len=4096, seed=0, num_needles=0)
    with pytest.raises(ValueError, match="raise key_digits"):
        PasskeyDataset(seq_len=4096, seed=0, num_needles=11, key_digits=1)
    with pytest.raises(ValueError, match="seed"):
        PasskeyDataset(seq_len=4096, seed=-1)
    with pytest.raises(ValueError, match="index"):
        PasskeyDataset(seq_len=4096, seed=0).sample(-1)


def test_build_dataset():
    from lctrain.config import DataConfig

    ds = build_dataset(DataConfig(name="passkey", seq_len=512, seed=0, num_needles=2), TOKENIZER)
    assert isinstance(ds, PasskeyDataset) and ds.seq_len == 512 and ds.num_needles == 2
    with pytest.raises(ValueError, match="copy, passkey, recall, text"):
        build_dataset(DataConfig(name="c4", seq_len=512, seed=0), TOKENIZER)


# --- loader ------------------------------------------------------------------


def batches(loader, num_steps):
    return [next(loader) for _ in range(num_steps)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in SAMPLE_KEYS)


def test_loader_shards_are_disjoint_and_union_is_single_rank_run():
    ds = PasskeyDataset(seq_len=256, seed=0, key_digits=3)
    dp_size, micro = 3, 2
    single = batches(ShardedLoader(ds, dp_size * micro, dp_rank=0, dp_size=1, seed=0), 3)
    ranks = [batches(ShardedLoader(ds, micro, dp_rank=r, dp_size=dp_size, seed=0), 3) for r in range(dp_size)]
    for step in range(3):
        assert ranks[0][step]["input_ids"].shape == (micro, 256)
        union = torch.cat([ranks[r][step]["input_ids"] for r in range(dp_size)])
        assert torch.equal(union, single[step]["input_ids"])
        assert len({tuple(row.tolist()) for row in union}) == dp_size * micro


def test_loader_resumes_exactly():
    ds = PasskeyDataset(seq_len=256, seed=0, key_digits=3, docs_per_seq=2)
    uninterrupted = batches(ShardedLoader(ds, 2, dp_rank=1, dp_size=2, seed=5), 6)
    first = ShardedLoader(ds, 2, dp_rank=1, dp_size=2, seed=5)
    batches(first, 4)
    state = first.state_dict()
    assert state["step"] == 4 and all(type(v) is int for v in state.values())
    resumed = ShardedLoader(ds, 2, dp_rank=1, dp_size=2, seed=5)
    resumed.load_state_dict(state)
    assert_batches_equal(batches(resumed, 2), uninterrupted[4:])
    # Same global batch on a different dp_size continues the same sample order.
    wider = [ShardedLoader(ds, 1, dp_rank=r, dp_size=4, seed=5) for r in range(4)]
    for loader in wider:
        loader.load_state_dict(state)
    union = torch.cat([next(loader)["input_ids"] for loader in wider])
    reference = ShardedLoader(ds, 4, dp_rank=0, dp_size=1, seed=5)
    reference.load_state_dict(state)
    assert torch.equal(union, next(reference)["input_ids"])


def test_loader_rejects_mismatched_state_and_bad_ranks():
    ds = PasskeyDataset(seq_len=256, seed=0, key_digits=3)
    state = ShardedLoader(ds, 2, dp_rank=0, dp_size=2, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardedLoader(ds, 2, dp_rank=0, dp_size=2, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        ShardedLoader(ds, 1, dp_rank=0, dp_size=2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_rank"):
        ShardedLoader(ds, 2, dp_rank=2, dp_size=2, seed=5)
    with pytest.raises(ValueError, match="micro_batch_size"):
        ShardedLoader(ds, 0, dp_rank=0, dp_size=2, seed=5)


def test_eval_batches_are_disjoint_from_training():
    ds = PasskeyDataset(seq_len=128, seed=0, key_digits=2)
    per_rank = [list(eval_batches(ds, 8, micro_batch_size=2, dp_rank=r, dp_size=2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]
    eval_rows = {tuple(row.tolist()) for batches_ in per_rank for b in batches_ for row in b["input_ids"]}
    assert len(eval_rows) == 8
    train = batches(ShardedLoader(ds, 8, dp_rank=0, dp_size=1, seed=0), 4)
    train_rows = {tuple(row.tolist()) for b in train for row in b["input_ids"]}
    assert not eval_rows & train_rows
    expected = ds.sample(EVAL_INDEX_OFFSET + 2)["input_ids"]  # rank 1, step 0, row 0
    assert torch.equal(per_rank[1][0]["input_ids"][0], expected)
    with pytest.raises(ValueError, match="multiple of"):
        eval_batches(ds, 7, micro_batch_size=2, dp_rank=0, dp_size=2)
