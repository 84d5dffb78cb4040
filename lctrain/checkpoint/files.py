"""The files of a checkpoint directory: digests, completeness, atomic rename and removal.

A checkpoint ``step_XXXXXXXX/`` is complete when its ``meta.json`` parses and every file it
lists exists with the SHA-256 digest recorded there. Saves go to ``step_X.partial/`` and are
renamed once complete; removal renames to ``.trash-step_X`` first, so a kill mid-removal
never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

META = "meta.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def step_dirs(root: Path) -> list[Path]:
    """``step_XXXXXXXX`` directories under ``root``, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def read_meta(step_dir: Path) -> dict:
    """``meta.json`` of a checkpoint; ValueError naming the file when missing or unreadable."""
    path = step_dir / META
    if not path.is_file():
        raise ValueError(f"{path} is missing: {step_dir.name} is an interrupted save or a damaged checkpoint")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}): the checkpoint is damaged (truncated?)") from None


def verify_files(step_dir: Path, digests: dict[str, str], names: list[str] | None = None) -> None:
    """ValueError naming the first file (of ``names``, default all) that is missing or whose
    SHA-256 differs from the one recorded at save time. Nothing is unpickled before this."""
    for name in names if names is not None else sorted(digests):
        path = step_dir / name
        if not path.is_file():
            raise ValueError(f"{path} is missing from checkpoint {step_dir.name} (recorded at save time)")
        if sha256_file(path) != digests[name]:
            raise ValueError(f"{path} does not match the SHA-256 recorded in {step_dir / META}: the file was "
                             f"changed or damaged after the save; refusing to load it")


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_dir(path: Path) -> None:
    """Rename to a trash name, then delete: never a half-deleted ``step_X``."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_writable(root: Path) -> None:
    """ValueError naming the directory when checkpoints cannot be written there."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"trainer.checkpoint_dir={root} is not writable ({err.strerror}); point "
                         f"trainer.checkpoint_dir at a writable directory") from None
