"""Multi-node as users launch it: two `launch/multinode.sh` agents on this machine act as two
nodes (c10d rendezvous on 127.0.0.1, 2 ranks each), dp 2 x cp 2 with each cp group inside a node
and engine=fsdp2; their losses equal one agent running the same 4 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lctrain.distributed.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["experiment=cpu_demo", "cp.size=2", "engine=fsdp2", "data.seq_len=512", "trainer.steps=3",
        "trainer.eval_samples=2", "trainer.num_threads=1", "model.num_layers=2", "trainer.progress=false",
        "trainer.eval_every=0", "trainer.save_final=false"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LCTRAIN_RUN_ID")}
    return {**env, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **extra}


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_two_agents_as_two_nodes_train_like_one_agent_with_four_ranks(tmp_path):
    port = free_port()
    nodes = [subprocess.Popen(["bash", str(ROOT / "launch" / "multinode.sh"), *ARGS], cwd=tmp_path,
                              env=_env(NNODES="2", NODE_RANK=str(n), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), NPROC="2", RUN_ID="two-nodes"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    one = subprocess.run([sys.executable, "-m", "lctrain.launch", "--nproc-per-node=4", "-m", "lctrain.train",
                          *ARGS], cwd=tmp_path, env=_env(LCTRAIN_RUN_ID="one-node"), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two_nodes, one_node = _losses(tmp_path / "outputs" / "two-nodes"), _losses(tmp_path / "outputs" / "one-node")
    assert len(two_nodes) == 3 and two_nodes == one_node
    report = json.loads((tmp_path / "outputs" / "two-nodes" / "state_bytes.json").read_text())
    assert len(report["ranks"]) == 4  # the model state is sharded over all four ranks of both nodes
