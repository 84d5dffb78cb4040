"""What clusters do to jobs, through the real launcher and CLI on gloo: preemption signals,
reruns in a used directory, damaged or crafted checkpoints, stalled ranks, a killed launcher,
and what listens on the network."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BASE = ["experiment=cpu_demo", "cp.size=2", "data.seq_len=256", "model.num_layers=2", "trainer.eval_samples=2",
        "trainer.num_threads=1", "trainer.progress=false", "trainer.eval_every=0"]
STEPS = 30


def _env(run_id: str) -> dict:
    env = {**os.environ, "LCTRAIN_RUN_ID": run_id, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def launch(cwd: Path, run_id: str, *overrides: str, ranks: int = 2) -> subprocess.Popen:
    """``python -m lctrain.launch --nproc-per-node=N -m lctrain.train ...`` in the background."""
    cmd = [sys.executable, "-m", "lctrain.launch", f"--nproc-per-node={ranks}", "-m", "lctrain.train",
           *BASE, *overrides]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(run_id), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def train(cwd: Path, run_id: str, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """One plain process (no launcher): the checks that need no process group."""
    cmd = [sys.executable, "-m", "lctrain.train", *BASE, "cp=none", "cp.size=1", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=_env(run_id), capture_output=True, text=True, timeout=timeout)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and sum('"train/loss"' in line for line in path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout}s")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the launcher's workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("full")
    code, out, err = finish(launch(cwd, "full", f"trainer.steps={STEPS}", "trainer.save_final=false"))
    assert code == 0, err[-3000:]
    return losses(cwd / "outputs" / "full")


@pytest.mark.parametrize("target", ["agent", "worker"])
def test_sigterm_saves_the_current_step_and_the_resume_continues_the_curve(tmp_path, uninterrupted, target):
    run_dir = tmp_path / "outputs" / "run"
    proc = launch(tmp_path, "run", f"trainer.steps={STEPS}", "trainer.save_final=false")
    wait_for_steps(run_dir, 8, proc)
    workers = children(proc.pid)
    os.kill(proc.pid if target == "agent" else workers[-1], signal.SIGTERM)  # SLURM signals workers
    finish(proc)
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["reason"] == "SIGTERM" and stopped["step"] >= 8
    assert Path(stopped["checkpoint"]).name == f"step_{stopped['step']:08d}"
    assert max(losses(run_dir)) == stopped["step"]  # the checkpoint is of the last finished step

    code, out, err = finish(launch(tmp_path, "run", f"trainer.steps={STEPS}", "trainer.save_final=false"))
    assert code == 0, err[-3000:]
    assert f"at step {stopped['step']}" in out
    assert losses(run_dir) == uninterrupted  # every step once, bit for bit the uninterrupted curve
    assert not (run_dir / "stopped.json").exists()
    logs = sorted(run_dir.glob("train_rank*.log"))
    assert [p.name for p in logs] == ["train_rank0.log", "train_rank1.log"]
    assert all("resumed run run" in p.read_text() and "step 30 loss" in p.read_text() for p in logs)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished single-process run with checkpoints at steps 4 and 6."""
    cwd = tmp_path_factory.mktemp("saved")
    proc = train(cwd, "saved", "trainer.steps=6", "trainer.checkpoint_every=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = cwd / "outputs" / "saved" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006"]
    return cwd, root


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_fresh_run_in_a_used_directory_is_refused_and_nothing_is_deleted(saved_run):
    cwd, root = saved_run
    before = _snapshot(root)
    proc = train(cwd, "saved", "trainer.steps=10", "trainer.checkpoint_every=2", "trainer.resume=none")
    assert proc.returncode == 2
    assert "trainer.resume=auto" in proc.stderr and "another directory" in proc.stderr
    proc = train(cwd, "saved", "trainer.steps=10", "trainer.seed=7")  # resume=auto, but another run
    assert proc.returncode == 2 and "trainer.seed (0 -> 7)" in proc.stderr and "resume_allow_changes" in proc.stderr
    assert _snapshot(root) == before


def test_resume_into_another_model_shape_names_the_fields(saved_run):
    cwd, root = saved_run
    proc = train(cwd, "saved", "trainer.steps=6", "model.num_layers=3", "model.dim=64")
    assert proc.returncode == 2
    assert "model.dim=128 there, 64 here" in proc.stderr and "model.num_layers=2 there, 3 here" in proc.stderr


def test_allowed_changes_resume(saved_run, tmp_path):
    cwd, root = saved_run
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    proc = train(cwd, "saved", "trainer.steps=8", f"trainer.checkpoint_dir={copy}",
                 "trainer.resume_allow_changes=[trainer.steps]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "at step 6 with changes ['trainer.steps']" in proc.stdout


class _Payload:
    """What a crafted pickle would run: it leaves a file behind if it ever does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_damaged_or_crafted_checkpoints_are_refused_before_unpickling(saved_run, tmp_path):
    cwd, root = saved_run
    marker = tmp_path / "code-ran"
    flipped, crafted = tmp_path / "flipped", tmp_path / "crafted"
    shutil.copytree(root / "step_00000006", flipped)
    shard = next(flipped.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = train(cwd, "saved", "trainer.steps=6", f"trainer.resume={flipped}")
    assert proc.returncode == 2 and f"{shard} does not match the SHA-256" in proc.stderr

    shutil.copytree(root / "step_00000006", crafted)
    (crafted / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    proc = train(cwd, "saved", "trainer.steps=6", f"trainer.resume={crafted}")
    assert proc.returncode == 2 and f"{crafted / '.metadata'} does not match the SHA-256" in proc.stderr
    # Even with its digest forged into meta.json, the allow-listed unpickler refuses it.
    meta = json.loads((crafted / "meta.json").read_text())
    import hashlib

    meta["files"][".metadata"] = hashlib.sha256((crafted / ".metadata").read_bytes()).hexdigest()
    (crafted / "meta.json").write_text(json.dumps(meta))
    proc = train(cwd, "saved", "trainer.steps=6", f"trainer.resume={crafted}")
    assert proc.returncode == 2 and "refusing to unpickle" in proc.stderr
    gen = subprocess.run([sys.executable, "-m", "lctrain.decode.cli", str(crafted), "--prompt", "hi"], cwd=cwd,
                         env=_env("gen"), capture_output=True, text=True, timeout=120)
    assert gen.returncode == 2 and "refusing to unpickle" in gen.stderr
    assert not marker.exists(), "the crafted metadata ran code"

    # auto: a damaged newest checkpoint is skipped loudly for the older one.
    auto = tmp_path / "auto"
    shutil.copytree(root, auto)
    (auto / "step_00000006" / "meta.json").write_text('{"step": 6, "trunc')
    proc = train(cwd, "saved", "trainer.steps=6", f"trainer.checkpoint_dir={auto}", "trainer.save_final=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping step_00000006" in proc.stdout and "resuming from the older step_00000004" in proc.stdout


def test_a_stalled_rank_fails_the_job_naming_it(tmp_path):
    run_dir = tmp_path / "outputs" / "stall"
    proc = launch(tmp_path, "stall", "trainer.steps=100000", "trainer.comm_timeout_s=20")
    wait_for_steps(run_dir, 5, proc)
    stalled = children(proc.pid)[-1]
    start = time.time()
    os.kill(stalled, signal.SIGSTOP)
    try:
        code, out, err = finish(proc, timeout=120)
    finally:
        os.kill(stalled, signal.SIGKILL) if alive(stalled) else None
    assert code != 0 and time.time() - start < 40
    assert "rank(s) 1 (silent for" in err and "trainer.comm_timeout_s=20" in err


def test_killing_the_launcher_leaves_no_worker_behind(tmp_path):
    run_dir = tmp_path / "outputs" / "orphans"
    proc = launch(tmp_path, "orphans", "trainer.steps=100000")
    wait_for_steps(run_dir, 5, proc)
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "workers outlived their launcher"
    assert json.loads((run_dir / "stopped.json").read_text())["reason"] == "SIGTERM"  # and they saved


def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state owned by ``pids``."""
    inodes = {}
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                inodes[fields[9]] = (family, fields[1])
    found = []
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.append(_address(*inodes[target[8:-1]]))
    return found


def _address(family: int, hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if family == 4:
        return f"{'.'.join(str(b) for b in raw[::-1])}:{int(port, 16)}"
    words = [raw[i:i + 4][::-1].hex() for i in range(0, 16, 4)]
    return f"[{':'.join(words)}]:{int(port, 16)}"


def test_nothing_listens_beyond_loopback(tmp_path):
    run_dir = tmp_path / "outputs" / "net"
    proc = launch(tmp_path, "net", "trainer.steps=100000")
    try:
        wait_for_steps(run_dir, 3, proc)
        addresses = _listening({proc.pid, *children(proc.pid)})
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert len(addresses) >= 3, addresses  # the launcher's stores and the workers' gloo sockets
    loopback = ("127.", "[00000000:00000000:00000000:00000001]", "[00000000:00000000:0000ffff:7f0")
    assert all(a.startswith(loopback) for a in addresses), addresses
