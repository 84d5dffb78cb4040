"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint, `<dir>/step_00000100/`:
  DCP shards + .metadata   model weights, optimizer tensors, each rank's RNG
  meta.json                step, world size, scheduler, data-loader state,
                           optimizer hyper-parameters (plain JSON, no pickle)

Everything non-tensor goes to JSON, so loading never unpickles: DCP would read
non-tensor values with torch.load(weights_only=False). A save is written into
`step_N.partial/` and renamed once every rank has finished and meta.json is on
disk; a crash mid-save leaves only a `.partial` directory, which resume ignores.

`group` (default: the world) is the set of ranks holding model state: with
dedicated attention servers only the workers save and load, so ranks, world
size and every barrier are relative to it and the servers take no part.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


def _barrier(group=None):
    if dist.is_initialized():
        dist.barrier(group=group)


def _rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    """Optimizer state keyed by parameter name; creates zero state when absent so
    DCP has tensors of the right shapes to load into."""
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for key, value in state.items():
            out[f"{name}.{key}"] = value
    return out


def _tensor_state(model, optimizer, rank: int) -> Dict[str, Any]:
    rng = {f"rank{rank}": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng[f"rank{rank}_cuda"] = torch.cuda.get_rng_state()
    return {"model": model.state_dict(), "optim": _optimizer_tensors(model, optimizer), "rng": rng}


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model, optimizer, scheduler,
                    data_state: Dict[str, Any], world_size: int, keep: int = 2, group=None) -> Path:
    """Every rank of ``group`` (None: the world) calls this; ``world_size`` is that group's size."""
    root = Path(ckpt_dir)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    rank = _rank(group)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
    _barrier(group)
    dcp.save(_tensor_state(model, optimizer, rank), checkpoint_id=str(partial), process_group=group)
    if rank == 0:
        meta = {
            "step": step,
            "world_size": world_size,
            "scheduler": scheduler.state_dict(),
            "data": data_state,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        }
        with open(partial / META, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a re-run of the same step replaces it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        _prune(root, keep)
    _barrier(group)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Optional[Path]:
    """Newest complete checkpoint (renamed from .partial, with meta.json), or None."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / META).is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, world_size: int,
                    group=None) -> Dict[str, Any]:
    """Restore everything in place; returns meta (step, data state). Every rank of ``group`` calls it."""
    path = Path(path)
    if not (path / META).is_file():
        raise ValueError(f"{path} is not a complete lctrain checkpoint (no {META}); "
                         f"point trainer.resume at a step_XXXXXXXX directory or use trainer.resume=auto")
    with open(path / META) as f:
        meta = json.load(f)
    rank = _rank(group)
    state = _tensor_state(model, optimizer, rank)
    same_world = meta["world_size"] == world_size
    if not same_world:  # per-rank RNG streams only make sense for the same ranks
        state.pop("rng")
    dcp.load(state, checkpoint_id=str(path), process_group=group)
    model.load_state_dict(state["model"])
    by_name = dict(model.named_parameters())
    for key, value in state["optim"].items():
        name, field = key.rsplit(".", 1)
        optimizer.state[by_name[name]][field].copy_(value)
    for param_group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        param_group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    scheduler.load_state_dict(meta["scheduler"])
    if same_world:
        torch.set_rng_state(state["rng"][f"rank{rank}"])
        if torch.cuda.is_available() and f"rank{rank}_cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"][f"rank{rank}_cuda"])
    return meta
