"""`lctrain-generate` end to end: train two tiny steps, then decode from the checkpoint under
torchrun with 2 context-parallel ranks (gloo), as text continuation and as passkey eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TRAIN = ["data.seq_len=512", "trainer.steps=2", "trainer.eval_samples=1", "trainer.num_threads=1",
         "model.num_layers=2", "model.dim=64", "model.ffn_dim=128", "trainer.save_final=true",
         "trainer.progress=false"]


def _env(run_id: str) -> dict:
    env = {**os.environ, "LCTRAIN_RUN_ID": run_id, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _generate(args, cwd, ranks=2):
    cmd = [sys.executable, "-m", "lctrain.launch", f"--nproc-per-node={ranks}",
           "-m", "lctrain.decode.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env("gen"), capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gen_cli")
    proc = subprocess.run([sys.executable, "-m", "lctrain.train", *TRAIN], cwd=cwd, env=_env("tiny"),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cwd / "outputs" / "tiny"
    assert (run / "checkpoints" / "step_00000002" / "meta.json").is_file()
    return run


def test_generate_cli_two_ranks_prompt_and_passkey_tree_and_ring_agree(run_dir):
    outputs = {}
    for decode, prefill, layout in (("tree", "tree", "striped"), ("ring", "ring", "zigzag")):
        out_json = run_dir / f"gen_{decode}.json"
        proc = _generate([str(run_dir), "--prompt", "The pass key is", "--max-new-tokens", "12",
                          "--passkey", "2", "--seq-len", "700", "--decode", decode, "--prefill", prefill,
                          "--layout", layout, "--json", str(out_json)], cwd=run_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "passkey decode at 700 tokens, 2 samples: exact keys" in proc.stdout
        assert "per-digit" in proc.stdout and f"decode {decode}" in proc.stdout
        outputs[decode] = json.loads(out_json.read_text())
    tree, ring = outputs["tree"], outputs["ring"]
    assert tree["cp_size"] == 2 and tree["checkpoint"].endswith("step_00000002")
    assert 1 <= len(tree["prompt"]["new_ids"]) <= 12
    # Exact decoding either way: the same greedy tokens, the same passkey answers.
    assert tree["prompt"]["new_ids"] == ring["prompt"]["new_ids"]
    for key in ("num_samples", "num_digits", "num_right", "num_exact"):
        assert tree["passkey"][key] == ring["passkey"][key]
    assert tree["passkey"]["num_samples"] == 2 and tree["passkey"]["num_digits"] == 10
    assert tree["passkey"]["collectives_per_token"] == 5 and tree["passkey"]["hops_per_token"] == 0
    assert ring["passkey"]["hops_per_token"] == 2  # 2 layers x (P - 1) hops


def test_generate_cli_without_a_checkpoint_names_the_fix(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lctrain.decode.cli", str(tmp_path), "--prompt", "hi"],
                          env=_env("x"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no complete lctrain checkpoint" in proc.stderr
