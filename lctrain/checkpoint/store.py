"""Saving, choosing and loading checkpoints (DCP tensors + JSON, verified before loading).

A save is written into ``step_N.partial/`` by every rank of ``group`` (the ranks holding
model state; None: the world); rank 0 then records the SHA-256 of every file in
``meta.json`` and renames the directory to ``step_N``, so an interrupted save is never
picked up. Loading checks those digests first, then unpickles DCP's ``.metadata`` through an
allow-list (``safe_reader``); tensors load with ``weights_only=True``; everything else is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from lctrain.distributed import broadcast_string

from .files import META, read_meta, remove_dir, sha256_file, step_dirs, verify_files, write_json_atomic
from .safe_reader import UNSAFE_MARK, SafeFileSystemReader, UnsafeCheckpointError

FORMAT_VERSION = 2  # meta.json with run identity and file digests


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


# ------------------------------------------------------------------------------------ save
def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model, optimizer, scheduler,
                    data_state: Dict[str, Any], world_size: int, keep: int = 2, group=None,
                    run: Dict[str, Any] | None = None, engine=None) -> Path:
    """Every rank of ``group`` calls this; ``world_size`` is that group's size. ``run``:
    ``{"run_id", "identity", "config"}`` recorded in meta.json (see ``identity``). ``engine``:
    a deepspeed engine writes its own files, plus the consolidated weights in DCP form."""
    root = Path(ckpt_dir)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    rank = _rank(group)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
    _barrier(group)
    deepspeed = _is_deepspeed(engine)
    with _quiet_single_process():
        if deepspeed:
            weights = engine.save_files(partial, rank)  # every rank; the whole weights on rank 0
            if rank == 0:
                dcp.save({"model": weights}, checkpoint_id=str(partial), no_dist=True)
        else:
            dcp.save(_tensor_state(model, optimizer, rank), checkpoint_id=str(partial), process_group=group)
    _barrier(group)  # every rank's shards are on disk before rank 0 hashes them
    if rank == 0:
        files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "engine": engine.name if engine is not None else "local",
            **({"zero_stage": engine.stage} if deepspeed else {}),
            "scheduler": scheduler.state_dict(),
            "data": data_state,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
            **(run or {}),
            "files": {name: sha256_file(partial / name) for name in files},
        }
        write_json_atomic(partial / META, meta)
        if final.exists():  # a save of the same step by this run replaces it whole
            remove_dir(final)
        os.replace(partial, final)
        prune_checkpoints(root, keep, (run or {}).get("run_id"))
    _barrier(group)
    return final


def prune_checkpoints(root: Path, keep: int, run_id: str | None) -> None:
    """Remove all but the newest ``keep`` complete checkpoints of ``run_id``; another run's
    checkpoints (and anything unreadable) are never touched."""
    ours = []
    for path in step_dirs(root):
        try:
            if read_meta(path).get("run_id") == run_id:
                ours.append(path)
        except ValueError:
            continue
    for old in ours[:-keep]:
        remove_dir(old)


# ---------------------------------------------------------------------------------- choose
def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Optional[Path]:
    """Newest checkpoint whose meta.json is readable (not yet verified), or None."""
    for path in reversed(step_dirs(Path(ckpt_dir))):
        try:
            read_meta(path)
            return path
        except ValueError:
            continue
    return None


def find_step_dir(path: str | os.PathLike) -> Path:
    """The checkpoint ``path`` names: a ``step_XXXXXXXX`` directory itself, else the newest complete
    one in ``path`` or in ``path/checkpoints`` (a run directory); not yet verified."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise ValueError(f"no complete lctrain checkpoint (step_XXXXXXXX/meta.json) at or under {path}")


def verify_checkpoint(path: Path) -> dict:
    """meta.json of ``path`` after checking every recorded file's digest (ValueError naming
    the file otherwise). Nothing is unpickled here."""
    meta = read_meta(path)
    if "files" not in meta:
        raise ValueError(f"{path / META} records no file digests (a checkpoint of an older lctrain); it cannot "
                         f"be verified, so it is not loaded")
    verify_files(path, meta["files"])
    return meta


@dataclass
class CheckpointChoice:
    """The newest checkpoint that verified, and the newer ones refused (path, reason)."""

    path: Path | None = None
    meta: dict | None = None
    refused: list = field(default_factory=list)


def choose_checkpoint(ckpt_dir: Path, device: torch.device, group=None) -> CheckpointChoice:
    """Rank 0 of ``group`` verifies the checkpoints newest first and every rank gets its choice."""
    choice = CheckpointChoice()
    if _rank(group) == 0:
        for path in reversed(step_dirs(Path(ckpt_dir))):
            try:
                choice.meta, choice.path = verify_checkpoint(path), path
                break
            except ValueError as err:
                choice.refused.append((path, str(err)))
    shared = json.loads(broadcast_string(json.dumps({"path": str(choice.path) if choice.path else None,
                                                     "refused": [(str(p), r) for p, r in choice.refused]}),
                                         device, group=group, max_bytes=1 << 16))
    path = Path(shared["path"]) if shared["path"] else None
    meta = choice.meta if _rank(group) == 0 else (read_meta(path) if path else None)
    return CheckpointChoice(path, meta, [(Path(p), r) for p, r in shared["refused"]])


# ------------------------------------------------------------------------------------ load
def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, world_size: int, group=None,
                    meta: dict | None = None, engine=None) -> Dict[str, Any]:
    """Restore everything in place; returns meta (step, data state). Every rank of ``group``
    calls it. ``meta``: the already verified meta.json (else verified here)."""
    path = Path(path)
    meta = meta if meta is not None else verify_checkpoint(path)
    rank = _rank(group)
    if _is_deepspeed(engine) or meta.get("engine") == "deepspeed":
        _check_deepspeed_resume(path, meta, engine, world_size)  # on every rank alike, before any collective
        engine.load_files(path, rank, same_world=True)
        scheduler.load_state_dict(meta["scheduler"])
        return meta
    state = _tensor_state(model, optimizer, rank)
    same_world = meta["world_size"] == world_size
    if not same_world:  # per-rank RNG streams only make sense for the same ranks
        state.pop("rng")
    _dcp_load(state, path, process_group=group)
    model.load_state_dict(state["model"])
    by_name = dict(model.named_parameters())
    for key, value in state["optim"].items():
        name, field_name = key.rsplit(".", 1)
        optimizer.state[by_name[name]][field_name].copy_(value)
    for param_group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        param_group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    scheduler.load_state_dict(meta["scheduler"])
    if same_world:
        torch.set_rng_state(state["rng"][f"rank{rank}"])
        if torch.cuda.is_available() and f"rank{rank}_cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"][f"rank{rank}_cuda"])
    return meta


def _is_deepspeed(engine) -> bool:
    return engine is not None and engine.name == "deepspeed"


def _check_deepspeed_resume(path: Path, meta: dict, engine, world_size: int) -> None:
    """A deepspeed checkpoint resumes only under deepspeed with the same ranks and ZeRO stage (its
    partitions are laid out for them); everything else can warm start from its weights."""
    warm = f"trainer.init_from={path} takes its model weights (optimizer and data start fresh)"
    saved_by = meta.get("engine", "local")
    if not _is_deepspeed(engine):
        raise ValueError(f"checkpoint {path} was written by engine=deepspeed; resume it with engine=deepspeed "
                         f"engine.zero_stage={meta.get('zero_stage')} on {meta['world_size']} ranks, or {warm}")
    if saved_by != "deepspeed":
        raise ValueError(f"checkpoint {path} was written by engine={saved_by} (DCP), which engine=deepspeed "
                         f"cannot resume; resume it with engine=ddp or engine=fsdp2, or {warm}")
    if meta["world_size"] != world_size or meta.get("zero_stage") != engine.stage:
        raise ValueError(f"checkpoint {path} holds ZeRO-{meta.get('zero_stage')} partitions of {meta['world_size']} "
                         f"ranks; this run has engine.zero_stage={engine.stage} on {world_size} ranks. Resume "
                         f"with those, or {warm}")


def load_model_weights(path: Path, model, group=None, collective: bool = False) -> dict:
    """The model weights of a verified checkpoint into ``model``; returns meta.json. Alone (every
    process reads the full weights), or ``collective`` over ``group``: each rank of a sharding
    engine then reads only its shards."""
    meta = verify_checkpoint(path)
    state = {"model": model.state_dict()}
    _dcp_load(state, path, **({"process_group": group} if collective else {"no_dist": True}))
    model.load_state_dict(state["model"])
    return meta


def _dcp_load(state, path: Path, **kwargs) -> None:
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), **kwargs)
    except (Exception, CheckpointException) as err:  # DCP wraps the reader's error in its own types
        if isinstance(err, UnsafeCheckpointError) or UNSAFE_MARK in str(err):
            raise ValueError(f"{path / '.metadata'}: {UNSAFE_MARK} an object outside DCP's metadata classes "
                             f"(damaged or crafted file); nothing was loaded") from None
        raise


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process when torch.distributed is not initialised: that
    is the intent here (plain ``python`` runs and ``lctrain-generate`` read every weight)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
