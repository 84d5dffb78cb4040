"""Reading DCP checkpoints without running code from them.

DCP stores its ``.metadata`` file with ``pickle``; a crafted one runs arbitrary code when a
plain ``FileSystemReader`` loads it. ``SafeFileSystemReader`` unpickles it with an allow-list:
exactly the classes DCP's metadata is made of (the ``torch.distributed.checkpoint.metadata``
dataclasses, DCP's storage info, ``torch.Size``, torch dtypes, the layout decoder, paths),
nothing else. Tensor shards already load through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}  # every class there is plain data
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}
_DTYPE_NAMES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


UNSAFE_MARK = "refusing to unpickle"


class UnsafeCheckpointError(ValueError):
    """The checkpoint's metadata asks to unpickle something outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module in _ALLOWED_MODULES or (module, name) in _ALLOWED
                   or (module == "torch" and name in _DTYPE_NAMES))
        if not allowed:
            raise UnsafeCheckpointError(
                f"checkpoint metadata references {module}.{name}, which a DCP checkpoint never holds; "
                f"{UNSAFE_MARK} it (the file is damaged or was crafted)")
        return super().find_class(module, name)


def load_metadata(path) -> Metadata:
    """A DCP ``.metadata`` file through the allow-listed unpickler."""
    with open(path, "rb") as f:
        metadata = _RestrictedUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path} does not hold DCP metadata (got {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata goes through the allow-listed unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = load_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
