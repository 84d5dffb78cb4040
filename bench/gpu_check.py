"""The one-GPU check: everything the CUDA path has to show, in one time-boxed run (~8 minutes).

Parts, each a subprocess with its own time box; ``gpu_check.json`` is rewritten after every
part, so a run cut short still returns what it measured:

1. ``kernel_tests``: ``pytest tests/kernels/test_triton_gpu.py`` (bf16 / fp16 at real sizes
   against the fp32 blockwise kernel);
2. ``kernel_targets``: ``bench/kernels.py --targets`` (Triton vs SDPA backends and compiled
   FlexAttention; causal 16k and packed documents; its own JSON and PNG);
3. ``train_throughput``: the trainer on one GPU, ``llama_1b``, bf16 autocast, activation
   checkpointing, at 8k / 32k / 128k tokens with ``kernel=triton`` and ``kernel=torch``:
   tokens/s (median of the steps after the first) and MFU = (6 N + 6 L d T) tokens/s / peak
   (N parameters, L layers, d model width, T tokens; causal attention; recomputation not
   counted), peak memory;
4. ``max_context``: the longest sequence ``llama_1b`` trains a step on (doubling from 64k
   until a failure or the time box), with its peak memory;
5. ``train_resume``: the trainer end to end (cp=none): checkpoints, then a rerun resumes.

    python bench/gpu_check.py              # one H100 / H200
    python bench/gpu_check.py --dry-run    # CPU: tiny sizes and time boxes, output to a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lctrain.benchmarking import add_output_options, output_dir, write_record

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s (SXM)
QUIET = ["trainer.progress=false", "trainer.eval_every=0", "trainer.eval_samples=1", "logger=none",
         "trainer.checkpoint_every=0", "trainer.save_final=false", "data=recall", "cp=none"]


def _run(cmd: list[str], timeout: float, cwd: Path, env: dict | None = None) -> dict:
    """rc, wall seconds and the last lines of output; rc 124 when the time box ran out."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, out = 124, (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - start, 1),
            "tail": "\n".join(out.strip().splitlines()[-12:])}


def _train(overrides: list[str], timeout: float, workdir: Path, run_id: str, env=None) -> dict:
    result = _run([sys.executable, "-m", "lctrain.train", *QUIET, *overrides], timeout, workdir,
                  {"LCTRAIN_RUN_ID": run_id, **(env or {})})
    metrics = workdir / "outputs" / run_id / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [r for r in rows if "train/tokens_per_s" in r]
    if len(steps) > 1:
        result["tokens_per_s"] = statistics.median(r["train/tokens_per_s"] for r in steps[1:])
    if steps and "train/peak_mem_gib" in steps[-1]:
        result["peak_mem_gib"] = max(r["train/peak_mem_gib"] for r in steps)
    result["steps_done"] = len(steps)
    return result


def _peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _model_numbers(model: str) -> tuple[int, int, int]:
    """(parameters, layers, width) of a model config."""
    from lctrain.config import compose_config

    m = compose_config([f"model={model}"]).model
    embed = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
    kv = m.dim // m.num_heads * m.num_kv_heads
    block = m.dim * (2 * m.dim + 2 * kv) + 3 * m.dim * m.ffn_dim + 2 * m.dim
    return embed + m.num_layers * block + m.dim, m.num_layers, m.dim


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_options(parser, "tiny model, tiny sizes, short time boxes (CPU)")
    args = parser.parse_args(argv)
    out = output_dir(args, "gpu_check", RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    dry = args.dry_run
    model = "tiny" if dry else "llama_1b"
    seqs = [128, 512] if dry else [8192, 32768, 131072]
    # The dry run drives the Triton path through its interpreter on CPU tensors.
    kernels = {"triton": {"TRITON_INTERPRET": "1"} if dry else {}, "torch": {}}
    model_args = [f"model={model}", "model.activation_checkpointing=true"] + (
        ["model.num_layers=2", "model.vocab_size=1299"] if dry else [])  # the recall task's ids
    record: dict = {"dry_run": dry, "model": model, "parts": {}}

    def save(name: str, value) -> None:
        record["parts"][name] = value
        path = write_record(out / "gpu_check.json", "gpu_check", record, argv)
        print(f"wrote {path} ({name} done)", flush=True)

    save("kernel_tests", _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(ROOT / "tests" / "kernels" / "test_triton_gpu.py")], 150, ROOT))
    save("kernel_targets", _run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--targets",
                                 *(["--dry-run"] if dry else ["--out", str(out)])], 120 if dry else 200, ROOT))

    params, layers, width = _model_numbers(model)
    peak = _peak_flops()
    rows = []
    for seq in seqs:
        for kernel, env in kernels.items():
            small = seq <= 128 or not dry  # the interpreter is slow: its dry run stays tiny
            if kernel == "triton" and not small:
                continue
            r = _train([*model_args, f"data.seq_len={seq}", f"kernel={kernel}", f"trainer.steps={2 if dry else 4}"],
                       90 if dry else 75, work, f"tp-{kernel}-{seq}", env)
            r.update(seq_len=seq, kernel=kernel)
            if peak and "tokens_per_s" in r:
                r["mfu"] = (6 * params + 6 * layers * width * seq) * r["tokens_per_s"] / peak
            rows.append(r)
            save("train_throughput", {"parameters": params, "peak_flops": peak, "rows": rows})

    attempts, seq, deadline = [], 256 if dry else 65536, time.perf_counter() + (60 if dry else 150)
    while time.perf_counter() < deadline and seq <= (1024 if dry else 1 << 22):
        r = _train([*model_args, f"data.seq_len={seq}", "kernel=auto", "trainer.steps=1",
                    "model.loss_chunk_tokens=4096"], max(10.0, deadline - time.perf_counter()), work, f"max-{seq}")
        r["seq_len"] = seq
        attempts.append(r)
        save("max_context", {"attempts": attempts,
                             "max_seq_len": max((a["seq_len"] for a in attempts if a["rc"] == 0), default=None)})
        if r["rc"] != 0:
            break
        seq *= 2

    resume = [*model_args, "data.seq_len=512" if dry else "data.seq_len=8192", "kernel=auto",
              "trainer.checkpoint_every=2"]
    first = _train([*resume, "trainer.steps=2"], 120, work, "resume")
    second = _train([*resume, "trainer.steps=4", "trainer.resume_allow_changes=[trainer.steps]"], 120, work,
                    "resume")
    save("train_resume", {"first": first, "second": second,
                          "resumed": "resumed run resume" in second["tail"] and second["rc"] == 0})
    failed = [name for name, part in record["parts"].items() if not _ok(part)]
    print("all parts ran" if not failed else f"parts with failures: {', '.join(failed)}")


def _ok(part: dict) -> bool:
    if "rc" in part:
        return part["rc"] == 0
    if "rows" in part:
        return all(r["rc"] == 0 for r in part["rows"])
    if "attempts" in part:
        return part["max_seq_len"] is not None
    return part.get("resumed", False)


if __name__ == "__main__":
    main()
