"""The sample format every dataset promises, as one assertion; the Evaluator driven by a chosen predictor."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lctrain.attention.strategies.base import AttentionSetup, LocalAttention
from lctrain.config import compose_config
from lctrain.data import SAMPLE_KEYS, build_dataset
from lctrain.data.tokenizer import ByteTokenizer
from lctrain.distributed.groups import ParallelGroups
from lctrain.evaluate import Evaluator


def assert_sample_invariants(sample: dict[str, torch.Tensor], seq_len: int, answers_only: bool = False) -> None:
    """The format every dataset promises (lctrain.data.sample); ``answers_only``: a task that
    labels only its answers (long-range copy)."""
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
    if answers_only:  # the task's targets are its only labels
        assert torch.equal(labels != -100, sample["answer_mask"])
    else:  # every in-document successor has its label
        assert torch.all(has_label[doc[:-1] == doc[1:]])
    # Positions count up by one inside a document.
    same_doc = doc[1:] == doc[:-1]
    assert torch.all(pos[1:][same_doc] == pos[:-1][same_doc] + 1)
    assert torch.all(labels[sample["answer_mask"]] != -100)


class _Predictor(nn.Module):
    """Logits are one-hot rows chosen by ``pick(labels)``: a model that predicts exactly that."""

    def __init__(self, vocab: int, pick):
        super().__init__()
        self.output_weight = torch.eye(vocab, dtype=torch.float64)
        self.pick, self.labels = pick, None

    def forward(self, input_ids, position_ids, doc_ids, token_pos):
        return nn.functional.one_hot(self.pick(self.labels).clamp_min(0), self.output_weight.shape[0]).double()

    def logits_at(self, hidden, mask):
        return hidden[mask] @ self.output_weight


def eval_with_predictor(dataset_name: str, pick) -> dict:
    """The real Evaluator's metrics for a model whose predictions are ``pick(labels)``, on 8
    held-out 512-token samples of ``data=dataset_name``."""
    cfg = compose_config([f"data={dataset_name}", "data.seq_len=512", "trainer.eval_samples=8"])
    dataset = build_dataset(cfg.data, ByteTokenizer())
    model = _Predictor(dataset.vocab_size_needed, pick)
    setup = AttentionSetup(LocalAttention("torch"), ParallelGroups(1, 1, 0, 0, None), None)

    def prepare(batch):
        model.labels = batch["labels"]
        return {**batch, "token_pos": torch.arange(512).expand(batch["input_ids"].shape)}

    return Evaluator(model, dataset, cfg, setup, torch.device("cpu"), prepare, contextlib.nullcontext)()


def assert_pure_and_resumable(make) -> None:
    """``make(seed)`` builds a 1024-token dataset with a 40-sample curriculum: its samples are pure
    functions of (seed, index), another seed differs, and a loader resumed from its state
    serves the batch the uninterrupted one would."""
    from lctrain.data import ShardedLoader

    a, b = make(1), make(1)
    for index in (0, 7, 39, 40, 2**40):
        assert all(torch.equal(a.sample(index)[k], b.sample(index)[k]) for k in a.sample(index))
    assert not torch.equal(a.sample(3)["input_ids"], make(2).sample(3)["input_ids"])
    loader = ShardedLoader(a, 1, 0, 1, seed=1)
    [next(loader) for _ in range(5)]
    resumed = ShardedLoader(a, 1, 0, 1, seed=1)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(next(resumed)["input_ids"], next(loader)["input_ids"])
