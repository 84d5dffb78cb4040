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
from lctrain.interop.hf import apply_hf_config

register_configs()


@hydra.main(config_path="pkg://lctrain.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    from lctrain.distributed import init_distributed, shutdown_distributed
    from lctrain.preemption import EXIT_STOPPED
    from lctrain.trainer import StalledRankError, build_rank

    rank, finished = None, False
    try:
        # Every config mistake surfaces here, before any process group or collective exists.
        apply_hf_config(cfg)  # model=hf: the shape comes from the directory's config.json
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        env = init_distributed(cfg.trainer.device, timeout_s=cfg.trainer.first_step_timeout_s)
        rank = build_rank(cfg, env, HydraConfig.get().runtime.output_dir)
        summary = rank.fit()
        finished = True
        if summary.get("final/stopped"):  # saved on request: a rerun resumes
            sys.exit(EXIT_STOPPED)
        return summary["final/train_loss"]
    except ValueError as err:  # a user mistake: one line naming the fix, no traceback
        _fail(f"lctrain: error (rank {os.environ.get('RANK', '0')}): {err}", 2)
    except StalledRankError as err:
        _fail(f"lctrain: {err}", 1)
    finally:
        if rank is not None:
            rank.close()
        shutdown_distributed(wait_for_peers=finished)


def _fail(message: str, code: int) -> None:
    import logging

    logging.getLogger("lctrain").error(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
