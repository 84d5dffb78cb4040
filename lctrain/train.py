"""Hydra entry point (`lctrain-train`, `python -m lctrain.train`): thin by design.

Works under `torchrun` with any number of processes and under plain `python`.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lctrain.config import register_configs, validate

register_configs()


@hydra.main(config_path="pkg://lctrain.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    from lctrain.distributed import init_distributed, shutdown_distributed
    from lctrain.trainer import build_rank

    rank = None
    try:
        # Every config mistake surfaces here, before any process group or collective exists.
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        env = init_distributed(cfg.trainer.device)
        rank = build_rank(cfg, env, HydraConfig.get().runtime.output_dir)
        return rank.fit()["final/train_loss"]
    except ValueError as err:  # a user mistake: one line naming the fix, no traceback
        print(f"lctrain: error (rank {os.environ.get('RANK', '0')}): {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if rank is not None:
            rank.close()
        shutdown_distributed()


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
