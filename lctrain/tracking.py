"""Metric tracking from rank 0: a JSONL file always, wandb when configured.

wandb runs offline by default (nothing leaves the machine; `wandb sync` later)
and never blocks start-up: no login prompt, no network probe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

LOGGER_NAMES = ("none", "wandb")
LOGGER_MODES = ("online", "offline", "disabled")  # wandb modes


class Tracker:
    def __init__(self, run_dir: Path, logger_cfg, full_config: Dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.wandb_run = None
        self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if logger_cfg.name == "wandb" and logger_cfg.mode != "disabled":
            self.wandb_run = _start_wandb(run_dir, logger_cfg, full_config)

    def rewind(self, step: int, checkpoint: str) -> None:
        """Resuming at ``step``: drop the rows of steps after it (logged after that checkpoint
        by the interrupted run) and mark the resume, so every step appears once."""
        if not self.enabled:
            return
        path = Path(self._jsonl.name)
        self._jsonl.close()
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
        self._jsonl = open(path, "a", buffering=1)
        self._jsonl.write(json.dumps({"step": step, "event": "resumed", "checkpoint": checkpoint}) + "\n")

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(metrics)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(run_dir: Path, cfg, full_config: Dict[str, Any]):
    import wandb

    if cfg.mode == "offline":
        # Offline must not phone home: no login check, no version check.
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ["WANDB_MODE"] = "offline"
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.run_name,
        tags=list(cfg.tags),
        mode=cfg.mode,
        dir=str(run_dir),
        config=full_config,
        settings=wandb.Settings(
            x_disable_stats=True,  # no system-metrics sampler thread
            x_disable_meta=True,
            console="off",
            init_timeout=60,
        ),
    )
