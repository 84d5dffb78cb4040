"""The sample format every dataset promises, as one assertion."""

from __future__ import annotations

import torch

from lctrain.data import SAMPLE_KEYS


def assert_sample_invariants(sample: dict[str, torch.Tensor], seq_len: int) -> None:
    """The format every dataset promises (lctrain.data.sample)."""
    assert tuple(sample) == SAMPLE_KEYS
    for key, tensor in sample.items():
        assert tensor.shape == (seq_len,), key
    assert sample["answer_mask"].dtype == torch.bool
    for key in ("input_ids", "labels", "position_ids", "doc_ids"):
        assert sample[key].dtype == torch.int64, key

    ids, labels, pos, doc = (sample[k] for k in ("input_ids", "labels", "position_ids", "doc_ids"))
    assert doc[0] == 0 and torch.all(doc[1:] - doc[:-1] >= 0) and torch.all(doc[1:] - doc[:-1] <= 1)
    # Labels never cross a document boundary and are the next token where set.
    has_label = labels[:-1] != -100
    assert labels[-1] == -100
    assert torch.all(doc[:-1][has_label] == doc[1:][has_label])
    assert torch.equal(labels[:-1][has_label], ids[1:][has_label])
    # Every in-document successor has its label.
    assert torch.all(has_label[doc[:-1] == doc[1:]])
    # Positions count up by one inside a document.
    same_doc = doc[1:] == doc[:-1]
    assert torch.all(pos[1:][same_doc] == pos[:-1][same_doc] + 1)
    assert torch.all(labels[sample["answer_mask"]] != -100)
