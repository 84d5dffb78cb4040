"""The `lctrain-train` command end to end: torchrun, plain python, wandb modes, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

SMALL = ["data.seq_len=512", "trainer.steps=3", "trainer.eval_samples=2", "trainer.num_threads=1",
         "model.num_layers=2"]


def _run(args, cwd, run_id, torchrun_ranks=0, timeout=300, extra_env=None):
    env = {**os.environ, "LCTRAIN_RUN_ID": run_id, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
           **(extra_env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if torchrun_ranks:
        cmd = [sys.executable, "-m", "lctrain.launch",
               f"--nproc-per-node={torchrun_ranks}", "-m", "lctrain.train", *args]
    else:
        cmd = [sys.executable, "-m", "lctrain.train", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def test_torchrun_two_ranks_trains_evaluates_and_checkpoints(tmp_path):
    proc, _ = _run(["experiment=cpu_demo", *SMALL, "trainer.checkpoint_every=2"], tmp_path, "cli2",
                   torchrun_ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"final train loss \d+\.\d{4} \| eval loss \d+\.\d{4} \| long-range recall accuracy "
                        r"\d+\.\d% \(chance 1\.6%\) at >= 224 tokens back \| exact answers \d+\.\d% \| "
                        r"3 steps in \d+s", final), final
    run_dir = tmp_path / "outputs" / "cli2"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3]
    assert any("eval/answer_acc" in x for x in lines)
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "curves.png").stat().st_size > 10_000
    assert (run_dir / "checkpoints" / "step_00000002" / "meta.json").is_file()
    assert {p.name for p in run_dir.glob("train_rank*.log")} == {"train_rank0.log", "train_rank1.log"}
    # lctrain-plot redraws the curves from metrics.jsonl; a directory without metrics says so.
    plot = subprocess.run([sys.executable, "-m", "lctrain.plot", str(run_dir), "--out", str(tmp_path / "re.png")],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0 and (tmp_path / "re.png").stat().st_size > 10_000, plot.stderr
    bad = subprocess.run([sys.executable, "-m", "lctrain.plot", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "metrics.jsonl does not exist" in bad.stderr


def test_torchrun_fsdp2_shards_the_model_state_and_reports_it(tmp_path):
    proc, _ = _run(["experiment=cpu_demo", *SMALL, "engine=fsdp2"], tmp_path, "fsdp", torchrun_ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine fsdp2: model state per rank" in proc.stdout
    report = json.loads((tmp_path / "outputs" / "fsdp" / "state_bytes.json").read_text())
    params = [r["params"] for r in report["ranks"]]
    assert report["engine"] == "fsdp2" and len(params) == 2 and max(params) < 0.55 * sum(params)
    # A warm start under the sharding engine: each rank reads its shards of the run's weights.
    warm, _ = _run(["experiment=cpu_demo", *SMALL, "engine=fsdp2", f"trainer.init_from={tmp_path / 'outputs' / 'fsdp'}"],
                   tmp_path, "fsdp-warm", torchrun_ranks=2)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "initialised the model from" in warm.stdout and "step_00000003" in warm.stdout


def test_torchrun_memory_profile_matches_the_estimate_and_the_fit_check_refuses(tmp_path):
    """trainer.memory_profile=true: every rank measures its first two steps' peak (PyTorch profiler)
    and writes it next to the estimate printed at start-up; a run that cannot fit stops before
    building anything, naming the knobs."""
    proc, _ = _run(["data.seq_len=4096", "trainer.steps=2", "trainer.eval_samples=1", "trainer.num_threads=1",
                    "cp=striped", "cp.size=2", "model.activation_checkpointing=true", "trainer.memory_profile=true",
                    "trainer.save_final=false"], tmp_path, "mem", torchrun_ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory per rank (estimate): params" in proc.stdout and "(2,048 tokens per rank)" in proc.stdout
    for rank in (0, 1):
        record = json.loads((tmp_path / "outputs" / "mem" / f"memory_rank{rank}.json").read_text())
        assert set(record["step_peaks"]) == {"step 1", "step 2"}
        assert abs(record["ratio"] - 1) < 0.10, record
    big, _ = _run(["model=llama_1b", "data.seq_len=4194304", "model.activation_checkpointing=false"], tmp_path, "big")
    assert big.returncode == 2
    assert "per rank (estimate, peak at" in big.stderr and "trainer.memory_check=false runs it anyway" in big.stderr
    assert not (tmp_path / "outputs" / "big" / "checkpoints").exists()


def test_torchrun_deepspeed_zero3_starts_fast_without_building_extensions_and_resumes(tmp_path):
    if not os.environ.get("CI"):
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")  # CI requires it
    extensions = tmp_path / "torch_extensions"  # where DeepSpeed's JIT builds would land
    env = {"TORCH_EXTENSIONS_DIR": str(extensions)}
    args = ["experiment=cpu_demo", *SMALL, "engine=deepspeed", "engine.zero_stage=3", "trainer.checkpoint_every=3"]
    proc, wall = _run(args, tmp_path, "ds", torchrun_ranks=2, extra_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine deepspeed: model state per rank" in proc.stdout
    assert not extensions.exists() or not any(extensions.iterdir()), "a C++ extension was built at start"
    assert wall < 60, f"a 3-step tiny deepspeed run took {wall:.0f}s"
    run_dir = tmp_path / "outputs" / "ds"
    report = json.loads((run_dir / "state_bytes.json").read_text())
    assert report["engine"] == "deepspeed" and len(report["ranks"]) == 2
    assert (run_dir / "checkpoints" / "step_00000003" / "deepspeed").is_dir()
    again, _ = _run([*args, "trainer.steps=4", "trainer.resume_allow_changes=[trainer.steps]"], tmp_path, "ds",
                    torchrun_ranks=2, extra_env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed run ds from" in again.stdout and "1 steps in" in again.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_modes_complete_without_network_or_delay(tmp_path, mode):
    baseline, t_none = _run([*SMALL, "logger=none"], tmp_path, "none")
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    proc, t_wandb = _run([*SMALL, "logger=wandb", f"logger.mode={mode}"], tmp_path, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline_runs = list((tmp_path / "outputs" / mode / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == (1 if mode == "offline" else 0)
    # A blocked network call would cost wandb's timeouts (tens of seconds).
    assert t_wandb - t_none < 20, f"wandb {mode} added {t_wandb - t_none:.1f}s"


@pytest.mark.parametrize("override,needle", [
    ("trainer.stepz=3", "stepz"),
    ("+trainer.stepz=3", "unknown config key trainer.stepz (did you mean trainer.steps?)"),
    ("trainer.checkpoint_dir=/proc/no/such/dir", "trainer.checkpoint_dir=/proc/no/such/dir is not writable"),
    ("trainer.resume_allow_changes=[model.dim]", "'model.dim' is not a field a resume checks"),
    ("trainer.stop_signals=[SIGNOPE]", "'SIGNOPE' is not a signal"),
    ("trainer.steps=abc", "steps"),
    ("model=nope", "nope"),
    ("kernel.name=fast", "kernel.name='fast' is not valid"),
])
def test_bad_overrides_fail_with_a_clear_message(tmp_path, override, needle):
    proc, _ = _run([override], tmp_path, "bad")
    assert proc.returncode != 0
    assert needle in proc.stderr


def test_world_size_not_dp_times_cp_fails_before_any_collective(tmp_path):
    proc, elapsed = _run(["trainer.dp=3"], tmp_path, "badworld", torchrun_ranks=2)
    assert proc.returncode != 0
    assert "world size 2 != dp (3) x cp (1)" in proc.stderr
    assert elapsed < 120


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_torchrun_trains_on_local_text_with_striped_cp(tmp_path, text_corpus, kind):
    """The path every real user takes: their own files, each sequence split over 2 ranks."""
    corpus = text_corpus(kind)
    extra = ["data.jsonl_key=body"] if kind == "jsonl" else []
    proc, _ = _run(["data=text", f"data.path={corpus}", *extra, "cp=striped", "cp.size=2", "data.seq_len=256",
                    "trainer.steps=3", "trainer.eval_samples=2", "trainer.num_threads=1", "model.num_layers=2"],
                   tmp_path, f"text-{kind}", torchrun_ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final train loss" in proc.stdout and "eval loss" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "outputs" / f"text-{kind}" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3]
    assert all(x["train/loss"] < 6.0 for x in lines if "train/loss" in x)  # byte vocabulary: ln 259 = 5.56
