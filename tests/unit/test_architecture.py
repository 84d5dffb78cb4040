"""The structure the README's architecture section describes, checked on the source tree.

- the import graph of lctrain/ and kernels/ (imports inside functions included) has no cycle;
- the trainer and evaluation name no strategy: strategies come from the registry;
- the project cites no design document outside itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lctrain.attention import strategy_names

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"lctrain": ROOT / "lctrain", "lctrain_kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    """Import name -> file of every module of the two packages."""
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, wherever the import statement sits."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from package import submodule` imports the submodule; otherwise the module itself.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_import_graph_has_no_cycles():
    modules = module_files()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 100  # the walk sees the real graph
    assert "lctrain_kernels.triton.plan_kernel" in graph["lctrain_kernels.triton.plan"]  # function-level too
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_trainer_and_evaluation_name_no_strategy():
    for name in ("trainer.py", "evaluate.py", "train.py", "batches.py"):
        source = (ROOT / "lctrain" / name).read_text()
        for strategy in strategy_names():
            if strategy != "none":
                assert not re.search(rf"[\"']{strategy}[\"']", source), (name, strategy)


def test_no_reference_to_design_files_outside_the_project():
    tracked = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts
               and p.suffix in {".py", ".md", ".yaml", ".toml", ".sh", ".sbatch", ".json", ""}
               and "outputs" not in p.parts]
    offenders = [str(p.relative_to(ROOT)) for p in tracked if "DESIGN" + ".md" in p.read_text(errors="ignore")]
    assert not offenders, offenders


ENTRY_MODULES = ("lctrain.disagg.runtime", "lctrain.disagg.attention", "lctrain.decode.cli", "lctrain.trainer",
                 "lctrain.attention.strategies.usp", "lctrain_kernels.triton.attention", "lctrain.config")


def test_entry_modules_import_first_in_a_fresh_interpreter():
    """Package __init__ files can close a cycle the module graph does not show: import each
    entry point first, in its own interpreter."""
    import subprocess
    import sys

    for name in ENTRY_MODULES:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"import {name} first fails:\n{proc.stderr[-2000:]}"
