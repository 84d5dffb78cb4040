"""The benchmark scripts stay runnable and self-contained.

Each script's ``--dry-run`` (tiny sizes, files to a fresh temp directory) runs in a subprocess,
as a user would run it, and must leave the recorded results in bench/results untouched. The
scripts import only the installed package, the standard library and numpy / torch / triton /
matplotlib: no path patching, nothing from tests/ or from each other.
(bench/kernels.py's dry run is tested in tests/kernels/test_bench_kernels.py.)
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
ALLOWED_TOP_LEVEL = {"lctrain", "lctrain_kernels", "numpy", "torch", "triton", "matplotlib"}


def _results_snapshot() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(RESULTS.iterdir()) if p.is_file()}


def dry_run(script: str, *extra: str, timeout: float = 120) -> dict:
    """Run ``bench/<script> --dry-run``; returns the JSON it wrote (asserting where it went)."""
    before = _results_snapshot()
    proc = subprocess.run([sys.executable, str(BENCH / script), "--dry-run", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert _results_snapshot() == before, "a dry run changed bench/results"
    written = [Path(p) for p in re.findall(r"^wrote (\S+\.json)", proc.stdout, flags=re.M)]
    assert written, proc.stdout[-2000:]
    path = written[-1]
    assert path.is_file() and RESULTS not in path.parents, path
    record = json.loads(path.read_text())
    assert {"device", "versions", "command"} <= record.keys()
    assert "--dry-run" in record["command"] and script in record["command"]
    return {**record, "stdout": proc.stdout}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_scripts_import_only_the_package(path):
    text = path.read_text()
    assert "sys.path" not in text, f"{path.name} patches the import path"
    foreign = _imported_modules(path) - ALLOWED_TOP_LEVEL - set(sys.stdlib_module_names)
    assert not foreign, f"{path.name} imports {sorted(foreign)}"


def test_cp_balance_dry_run_validates_the_model_on_gloo():
    record = dry_run("cp_balance.py")
    assert record["validation_real_strategies"]["ok"]
    assert record["cross_check_count_visible_pairs"]["ok"]
    assert {row["strategy"] for row in record["rows"]} == {"ring", "allgather", "ulysses", "usp", "tree"}
    assert "counters match" in record["stdout"]


def test_disagg_balance_dry_run():
    record = dry_run("disagg_balance.py")
    methods = {row["method"] for row in record["rows"]}
    assert {"colocated", "ring-striped", "disagg-colocated", "disagg-dedicated"} <= methods


def test_tree_decode_dry_run_counts_the_combines():
    record = dry_run("tree_decode.py")
    (row,) = record["measured"]  # P = 2
    assert (row["tree"]["collectives"], row["butterfly"]["hops"], row["ring"]["hops"]) == (2, 1, 1)
    assert "assume" in record["network_model"]["source"]


@pytest.mark.slow
def test_disagg_pingpong_dry_run():
    record = dry_run("disagg_pingpong.py", timeout=300)
    assert set(record["summary"]) == {"colocated", "dedicated"}


def test_kernel_compile_dry_run():
    pytest.importorskip("triton")
    record = dry_run("kernel_compile.py", timeout=180)
    assert {row["name"] for row in record["results"]} == {"fwd", "dkdv", "dq"}


def test_cp_counters_dry_run_times_the_three_variants():
    record = dry_run("cp_counters.py")
    assert set(record["ratio_to_raw"]) == {"raw", "trainer", "counted"}
    assert record["ratio_to_raw"]["raw"] == 1.0 and record["counted_pairs_per_call"] > 0


def test_engine_memory_dry_run_counts_real_shards():
    record = dry_run("engine_memory.py")
    rows = {(r["engine"], r["ranks"]): r for r in record["rows"]}
    assert rows["ddp", 2]["total"] == rows["ddp", 4]["total"]
    assert rows["ddp", 2]["ratio_to_formula"] == pytest.approx(1.0, rel=1e-4)  # + AdamW's step counters
    # fsdp2 rank 0 holds ceil(rows / N) of every tensor: within a fraction of a percent of 16 B x P / N.
    assert 1.0 <= rows["fsdp2", 4]["ratio_to_formula"] < 1.01 and rows["fsdp2", 4]["total"] < rows["fsdp2", 2]["total"]
    # DeepSpeed's rule: fp32 ZeRO-3 keeps an fp32 master copy too (x1.25); with bf16 weights, 16 B x P / N.
    assert rows["zero3", 4]["ratio_to_formula"] == pytest.approx(1.25, rel=1e-3)
    assert rows["zero3-bf16", 4]["ratio_to_formula"] == pytest.approx(1.0, rel=1e-3)
    assert rows["zero1", 4]["total"] > rows["zero2", 4]["total"] > rows["zero3", 4]["total"]


def test_gpu_check_dry_run_runs_every_part():
    record = dry_run("gpu_check.py", timeout=400)
    parts = record["parts"]
    assert set(parts) == {"kernel_tests", "kernel_targets", "train_throughput", "max_context", "train_resume"}
    assert "all parts ran" in record["stdout"]
    assert {(r["kernel"], r["seq_len"]) for r in parts["train_throughput"]["rows"]} == {
        ("triton", 128), ("torch", 128), ("torch", 512)}
    assert all(r["tokens_per_s"] > 0 for r in parts["train_throughput"]["rows"])
    assert parts["max_context"]["max_seq_len"] >= 512 and parts["train_resume"]["resumed"]


def test_memory_dry_run_measures_and_predicts():
    record = dry_run("memory.py", timeout=300)
    (point,) = record["points"]
    assert point["ranks"] == 2 and len(point["measured"]) == 2 and all(m > 0 for m in point["measured"])
    assert all(0.7 < r < 1.3 for r in point["ratios"])
    assert record["max_context"] and all(r["max_tokens"] > 0 for r in record["max_context"])
    assert {r["recipe"].split(" (")[0] for r in record["alst"]} >= {"+ Ulysses SP 8", "+ tiled MLP"}


def test_plan_validation_dry_run_times_and_predicts():
    record = dry_run("plan_validation.py", timeout=300)
    assert [r["setup"] for r in record["published"]] == ["8 x A100, 256k tokens", "16 x TPU v4, 786k tokens"]
    assert all(r["predicted"] > 1 for r in record["published"])  # striped beats the contiguous ring
    assert len(record["gloo"]) == 2 and all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in record["gloo"])
    assert record["calibration"]["bandwidth_Bps"] > 0 and "2" in record["agreement"]


def test_passkey_stages_records_each_stage_from_its_run_directory(tmp_path):
    runs = []
    for name, acc in (("s1", None), ("s2", 0.5)):
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- experiment=cpu_passkey_{name}\n- trainer.steps=20\n")
        rows = [{"step": s, "train/loss": 3.0 / s, "train/step_time_s": 0.5} for s in range(1, 21)]
        if acc is not None:
            rows.append({"step": 20, "eval/answer_acc": acc, "eval/answer_chance": 0.1})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(str(run))
    record = dry_run("passkey_stages.py", *runs)
    first, second = record["stages"]
    assert first["overrides"] == ["experiment=cpu_passkey_s1", "trainer.steps=20"] and first["eval_answer_acc"] == []
    assert second["steps"] == 20 and second["step_seconds"] == 10.0 and second["eval_answer_acc"] == [[20, 0.5]]
    assert [x for x, _ in second["train_loss"]] == [10, 20]
