"""Where a run starts: from scratch, or from which verified, compatible checkpoint.

``trainer.resume``:
- ``auto`` (default): the newest checkpoint in the directory whose files verify; newer ones
  that do not are skipped with a warning naming them and the one used; none at all: a fresh
  start (a directory holding only broken checkpoints is an error, so nothing is lost silently);
- ``none``: a fresh start, refused when the directory already holds checkpoints (resuming
  them and starting afresh elsewhere are the two ways out; nothing is ever deleted);
- a ``step_XXXXXXXX`` path: that checkpoint, verified.

Every rank gets the same answer: rank 0 of the model group looks at the files and broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from lctrain.distributed import broadcast_string

from .files import read_meta
from .identity import check_compatible, identity_fields
from .store import choose_checkpoint, latest_checkpoint, verify_checkpoint


@dataclass
class ResumePoint:
    path: Path | None = None  # None: start fresh
    meta: dict | None = None
    warnings: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # allowed config changes carried by the resume


def _on_rank0(fn, device, group) -> str:
    """``fn()`` on rank 0 of ``group`` (a message, "" when fine), the same string on every rank."""
    first = not dist.is_initialized() or dist.get_rank(group) == 0
    return broadcast_string(fn() if first else "", device, group=group)


def find_resume_point(cfg, ckpt_dir: Path, device: torch.device, group=None) -> ResumePoint:
    resume = cfg.trainer.resume
    if resume == "none":
        def existing() -> str:
            newest = latest_checkpoint(ckpt_dir)
            return str(newest) if newest else ""

        newest = _on_rank0(existing, device, group)
        if newest:
            raise ValueError(
                f"trainer.resume=none but {ckpt_dir} already holds checkpoints (newest {Path(newest).name}); "
                f"continue that run with trainer.resume=auto, or start afresh in another directory "
                f"(trainer.checkpoint_dir=<new dir>, or a new LCTRAIN_RUN_ID); nothing was deleted")
        return ResumePoint()
    if resume == "auto":
        choice = choose_checkpoint(ckpt_dir, device, group)
        point = ResumePoint(choice.path, choice.meta)
        if choice.refused and choice.path is None:
            raise ValueError(f"no checkpoint in {ckpt_dir} verifies: " + "; ".join(r for _, r in choice.refused)
                             + "; remove or repair them, or train in a fresh trainer.checkpoint_dir")
        point.warnings = [f"skipping {p.name}: {reason}; resuming from the older {choice.path.name}"
                          for p, reason in choice.refused]
    else:
        path = Path(resume)
        error = _on_rank0(lambda: _verify_message(path), device, group)
        if error:
            raise ValueError(f"trainer.resume={resume}: {error}")
        point = ResumePoint(path, read_meta(path))  # verified by rank 0 above
    if point.path is not None:
        point.changes = check_compatible(point.meta.get("identity", {}), identity_fields(cfg),
                                         cfg.trainer.resume_allow_changes, point.path)
    return point


def _verify_message(path: Path) -> str:
    try:
        verify_checkpoint(path)
        return ""
    except ValueError as err:
        return str(err)
