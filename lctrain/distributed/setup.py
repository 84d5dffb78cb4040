"""Process-group set-up and the few collectives the trainer needs.

Everything here runs on CPU with gloo (CI has no GPU), so no torch.cuda calls
beyond choosing the device and backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: Optional[str]  # None: single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistEnv:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA), or run alone.

    Under plain `python` (no RANK/WORLD_SIZE in the environment) no process group
    is created and every collective below degrades to a no-op. ``timeout_s``: the
    collective timeout (None: the backend's default). Under torchrun the worker
    also asks for SIGTERM when the agent dies, so it never trains on as an orphan.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "nccl" if use_cuda else "gloo"
        if "TORCHELASTIC_RUN_ID" in os.environ:
            from lctrain.distributed.watchdog import exit_with_parent

            exit_with_parent()
        if not dist.is_initialized():
            timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
            dist.init_process_group(backend=backend, device_id=dev if use_cuda else None, **timeout)
    return DistEnv(rank, world, local_rank, local_world, dev, backend)


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """Leave the process group. After a run every rank first waits for the others, so no rank
    tears its sockets down while a peer's gloo thread still reads from them (which aborts the
    peer); on a failure path (``wait_for_peers=False``) it just leaves."""
    if dist.is_initialized():
        if wait_for_peers:
            try:
                dist.barrier()
            except RuntimeError:  # a peer is already gone: nothing left to wait for
                pass
        dist.destroy_process_group()


def all_ranks_flag(flag: bool, device: torch.device, group=None) -> List[int]:
    """Ranks (within group) whose local flag is set; every rank gets the same list."""
    if not dist.is_initialized():
        return [0] if flag else []
    world = dist.get_world_size(group)
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    flags[dist.get_rank(group)] = int(flag)
    dist.all_reduce(flags, group=group)
    return [r for r in range(world) if flags[r].item()]


def broadcast_string(text: str, device: torch.device, group=None, max_bytes: int = 4096) -> str:
    """Group rank 0's string on every rank of ``group`` (None: the world), sent as a fixed-size
    byte tensor (no pickle)."""
    if not dist.is_initialized():
        return text
    data = text.encode()
    if len(data) > max_bytes:
        raise ValueError(f"string of {len(data)} bytes exceeds broadcast limit {max_bytes}")
    buf = torch.zeros(max_bytes + 8, dtype=torch.uint8, device=device)
    if dist.get_rank(group) == 0:
        buf[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        buf[8:8 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, group=group, group_src=0)
    raw = bytes(buf.cpu().tolist())
    return raw[8:8 + int.from_bytes(raw[:8], "little")].decode()


def gather_strings(text: str, device: torch.device, group=None) -> list[str]:
    """Every rank's string (in group-rank order) on every rank of ``group``: lengths first, then
    the padded bytes, as uint8 tensors (no pickle)."""
    if not dist.is_initialized():
        return [text]
    size = dist.get_world_size(group)
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    lengths = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([data.numel()], dtype=torch.long, device=device), group=group)
    width = max(int(n) for n in lengths)
    padded = torch.zeros(width, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return [bytes(part[:int(n)].cpu().tolist()).decode() for part, n in zip(parts, lengths)]
