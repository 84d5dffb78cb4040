"""Trainers of a tiny model built from composed configs, as the CLI would build them."""

from __future__ import annotations

from pathlib import Path

from lctrain.config import compose_config
from lctrain.distributed import init_distributed
from lctrain.trainer import Trainer, build_rank

BASE = ["data.seq_len=256", "trainer.eval_samples=2", "trainer.progress=false", "trainer.num_threads=1",
        "model.dim=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_dim=64",
        "optim.warmup_steps=2", "data.num_needles=1"]


def trainer(overrides, run_dir, env=None) -> Trainer:
    cfg = compose_config(BASE + list(overrides))
    return Trainer(cfg, env or init_distributed("cpu"), Path(run_dir))


def rank(overrides, run_dir, env=None):
    """What this rank runs for the config: a Trainer or an attention-server rank."""
    cfg = compose_config(BASE + list(overrides))
    return build_rank(cfg, env or init_distributed("cpu"), Path(run_dir))


def run_steps(t: Trainer, n: int) -> list[float]:
    return [t.train_step() for _ in range(n)]


def run_with_norms(overrides, run_dir, steps: int):
    """(trainer, losses, gradient norms) after ``steps`` steps of a fresh trainer."""
    t = trainer(overrides, run_dir)
    losses, norms = [], []
    for _ in range(steps):
        losses.append(t.train_step())
        norms.append(t._last_grad_norm)
    return t, losses, norms


def poisoned_step(t: Trainer, rank: int) -> tuple[str, bool]:
    """One step after rank 1 poisoned an embedding row (BOS starts every sample): the NaN guard's
    message ("no error" if none) and whether any finite parameter changed."""
    import torch

    from lctrain.trainer import NonFiniteError

    if rank == 1:
        with torch.no_grad():
            t.model.embed.weight[256].fill_(float("nan"))
    before = [p.detach().clone() for p in t.model.parameters()]
    try:
        t.train_step()
        message = "no error"
    except NonFiniteError as err:
        message = str(err)
    changed = any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()) if not a.isnan().any())
    return message, changed
