"""Data-parallel batching with exact, plain-int resumable state.

Global sample index of dp rank r at step t, row j:

    t * (dp_size * micro_batch_size) + r * micro_batch_size + j

so ranks see disjoint samples and their union is the run of one rank with a
micro batch of dp_size * micro_batch_size. Datasets generate sample i from
(seed, i) alone, so resuming is just remembering the step.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from lctrain.data.sample import SAMPLE_KEYS

# Eval samples come from indices >= 2**40, which training never reaches
# (2**40 samples of even 4k tokens are 4.5e15 tokens).
EVAL_INDEX_OFFSET = 2**40


class Dataset(Protocol):
    seq_len: int
    seed: int

    def sample(self, index: int) -> dict[str, torch.Tensor]: ...


def rank_sample_indices(step: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> range:
    """Global sample indices of `dp_rank`'s micro batch at `step`."""
    first = step * dp_size * micro_batch_size + dp_rank * micro_batch_size
    return range(first, first + micro_batch_size)


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into (micro_batch, seq_len) tensors."""
    return {key: torch.stack([s[key] for s in samples]) for key in SAMPLE_KEYS}


def _check_sharding(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")


class ShardedLoader:
    """Infinite iterator over this dp rank's micro batches.

    `seed` is the run's data seed. Samples are fixed by the dataset's own seed;
    the loader records `seed` and the global batch size in its state so that
    resuming a checkpoint under a different data configuration fails loudly
    instead of silently replaying other data.
    """

    def __init__(self, dataset: Dataset, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        _check_sharding(micro_batch_size, dp_rank, dp_size)
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.step = 0

    @property
    def global_batch_size(self) -> int:
        return self.dp_size * self.micro_batch_size

    def __iter__(self) -> ShardedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        indices = rank_sample_indices(self.step, self.micro_batch_size, self.dp_rank, self.dp_size)
        assert indices.stop <= EVAL_INDEX_OFFSET, "training ran into the eval index space"
        batch = collate([self.dataset.sample(i) for i in indices])
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Plain ints: the next step to serve and what fixes the sample order."""
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume so the next batch is the one the uninterrupted loader would give.

        dp_size may change across a restart as long as the global batch size
        does not (the sample order depends on it only).
        """
        for key in ("seed", "global_batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"data loader checkpoint has {key}={int(state[key])} but this run has "
                    f"{key}={getattr(self, key)}; resume with the same {key} or start the data stream afresh"
                )
        self.step = int(state["step"])


def eval_batches(
    dataset: Dataset, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro batches of `num_samples` eval samples.

    Eval samples use indices from EVAL_INDEX_OFFSET on, disjoint from training
    indices. Every rank yields the same number of full batches (so collectives
    in the eval loop line up), hence num_samples must divide evenly.
    For the text dataset, disjoint indices are not held-out text: build the eval
    dataset from separate files.
    """
    _check_sharding(micro_batch_size, dp_rank, dp_size)
    global_batch_size = dp_size * micro_batch_size
    if num_samples < 1 or num_samples % global_batch_size:
        suggestion = max(1, round(num_samples / global_batch_size)) * global_batch_size
        raise ValueError(
            f"num_samples={num_samples} must be a positive multiple of dp_size * micro_batch_size = "
            f"{global_batch_size}; use e.g. {suggestion}"
        )
    # A generator expression, not a generator function, so the checks above run at call time.
    steps = range(num_samples // global_batch_size)
    return (_eval_batch(dataset, step, micro_batch_size, dp_rank, dp_size) for step in steps)


def _eval_batch(dataset: Dataset, step: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    indices = rank_sample_indices(step, micro_batch_size, dp_rank, dp_size)
    return collate([dataset.sample(EVAL_INDEX_OFFSET + i) for i in indices])
