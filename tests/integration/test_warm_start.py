"""trainer.init_from: a fresh run starts from another run's weights (verified), with a fresh
optimizer, schedule and data stream; a shape mismatch is a ValueError naming the option."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.training import run_steps, trainer


def test_a_warm_start_takes_the_weights_and_nothing_else(tmp_path):
    first = trainer(["trainer.steps=3"], tmp_path / "first")
    run_steps(first, 3)
    saved = first.save()
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    first.close()

    # A run directory, its checkpoints directory and the step directory all name the same weights.
    for source in (tmp_path / "first", saved.parent, saved):
        warm = trainer(["trainer.steps=3", f"trainer.init_from={source}"], tmp_path / f"warm_{source.name}")
        assert warm.step == 0 and not warm.optimizer.state
        assert all(torch.equal(weights[k], v) for k, v in warm.model.state_dict().items())
        assert warm.loader.state_dict()["step"] == 0
        run_steps(warm, 1)
        warm.close()

    fresh = trainer(["trainer.steps=3"], tmp_path / "fresh")
    assert not all(torch.equal(weights[k], v) for k, v in fresh.model.state_dict().items())
    fresh.close()


def test_a_warm_start_of_another_shape_names_the_option(tmp_path):
    first = trainer(["trainer.steps=1"], tmp_path / "first")
    first.save()
    first.close()
    with pytest.raises(ValueError, match="trainer.init_from="):
        trainer(["model.dim=64", f"trainer.init_from={tmp_path / 'first'}"], tmp_path / "other")
    with pytest.raises(ValueError, match="no complete lctrain checkpoint"):
        trainer([f"trainer.init_from={tmp_path / 'missing'}"], tmp_path / "other2")
