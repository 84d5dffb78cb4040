"""Atomic, verified, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint, ``<dir>/step_00000100/``:
  DCP shards + .metadata   model weights, optimizer tensors, each rank's RNG
  meta.json                step, world size, scheduler, data-loader state, optimizer
                           hyper-parameters, the run id and config fields (``identity``),
                           the full resolved config, and the SHA-256 of every other file

``store`` writes and reads them; ``files`` holds digests and atomic renames; ``identity``
what a resume may change; ``safe_reader`` the allow-listed unpickling of DCP's metadata.
"""

from .files import META, check_writable, read_meta
from .store import (
    CheckpointChoice,
    choose_checkpoint,
    find_step_dir,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    prune_checkpoints,
    save_checkpoint,
)

__all__ = ["META", "CheckpointChoice", "check_writable", "choose_checkpoint", "find_step_dir", "latest_checkpoint",
           "load_checkpoint", "load_model_weights", "prune_checkpoints", "read_meta", "save_checkpoint"]
