"""What every benchmark records next to its figures, and the small helpers they share.

A result file must say where and how its numbers came from: the device, the versions of what
computed them and the exact command that reproduces them. ``write_record`` adds those to a
benchmark's own fields, so no script writes them differently.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path


def device_name() -> str:
    """The CUDA device when one is visible, else the CPU model."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_name()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(*extra_modules: str) -> dict[str, str]:
    """Versions of python, torch and numpy, and of ``extra_modules`` where importable."""
    found = {"python": platform.python_version()}
    for name in ("torch", "numpy", *extra_modules):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = "not installed"
    return found


def environment(*extra_modules: str) -> dict:
    """Device, core count, platform and versions: the fields every result file starts with."""
    return {"device": device_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "versions": versions(*extra_modules)}


def command_line(argv: list[str] | None = None) -> str:
    """The command that reproduces this run: ``python <script> <args>`` (``argv``: the arguments
    ``main`` was given, None for the process's own)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", str(script), *args])


def write_record(path: Path, benchmark: str, fields: dict, argv: list[str] | None = None,
                 extra_modules: tuple[str, ...] = (), indent: int = 1) -> Path:
    """Write ``fields`` as JSON at ``path``, after the benchmark's name, its environment and the
    command; ``fields`` may override the environment's entries (e.g. a compile-only device)."""
    record = {"benchmark": benchmark, **environment(*extra_modules), "command": command_line(argv), **fields}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent) + "\n")
    return path


def add_output_options(parser: argparse.ArgumentParser, dry_run_help: str) -> None:
    """``--out DIR`` and ``--dry-run`` (tiny sizes, described by ``dry_run_help``)."""
    parser.add_argument("--out", type=Path, default=None, help="output directory (default bench/results)")
    parser.add_argument("--dry-run", action="store_true", help=f"{dry_run_help}; files to a temp dir")


def output_dir(args: argparse.Namespace, benchmark: str, results: Path) -> Path:
    """``--out`` if given, else a fresh temporary directory for a dry run (recorded results stay
    untouched), else ``results``."""
    if args.out is not None:
        return args.out
    return Path(tempfile.mkdtemp(prefix=f"{benchmark}-dry-run-")) if args.dry_run else results


def fmt_bytes(n: int) -> str:
    """Binary units, two decimals: 1536 -> '1.50 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def pyplot(path: Path):
    """matplotlib's pyplot on the file-only Agg backend, or None (saying so) when matplotlib is
    not installed: the figures are optional, the JSON is the result."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: skipping {path} (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
