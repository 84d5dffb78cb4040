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
