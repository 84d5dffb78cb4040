"""The memory model (``lctrain.memory.estimate``) against measurement, and the longest sequence it
predicts per GPU, next to Arctic Long Sequence Training's (ALST) published figures.

1. **Validation**: ``lctrain.train`` runs two steps with ``trainer.memory_profile=true`` (what
   the engine holds once it is built, counted tensor by tensor, plus the PyTorch profiler's
   allocation events from there through step 2) for the
   ``tiny`` and ``llama_150m`` widths (the latter with 2 layers, to keep CPU time sane) at 4k and
   16k tokens, on 1 rank (cp=none) and 2 gloo ranks (cp=striped), with each combination of
   block checkpointing, the tiled MLP and activation offload; every rank's measured peak is set
   against the estimate. On CPU the offloaded copies stay in the same memory, so offload changes
   nothing there; it is measured to show that the path runs and costs what the model says.
2. **Prediction**: the longest ``data.seq_len`` whose estimate fits one GPU (an H100 80GB's
   79.6 GiB, an H200's 140.4 GiB; 10% held back for the CUDA context, communication buffers and
   allocator fragmentation) for
   ``llama_1b`` and ``llama3_8b`` with each technique at cp = 1, 8, 32 (FSDP2 over all ranks,
   bf16 compute, the Triton kernel); and ALST's recipe ladder for Llama-3.1-8B on 8 x H100-80GB
   (DeepSpeed ZeRO-3 in bf16, Ulysses), with the ratio predicted / published.

    python bench/memory.py                 # validation grid (~45 min on 2 cores) + tables
    python bench/memory.py --skip-measure  # tables only (a minute)
    python bench/memory.py --reuse-points bench/results/memory.json   # re-estimate recorded points
    python bench/memory.py --dry-run       # one tiny 2-rank point at 2048 tokens, output to a temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from lctrain.benchmarking import add_output_options, fmt_bytes, output_dir, pyplot, write_record
from lctrain.config import compose_config, compose_object
from lctrain.memory import estimate

RESULTS = Path(__file__).resolve().parent / "results"
KNOBS = {
    "plain": [],
    "ckpt": ["model.activation_checkpointing=true"],
    "tiled": ["model.mlp_tile_tokens=1024"],
    "ckpt+tiled": ["model.activation_checkpointing=true", "model.mlp_tile_tokens=1024"],
    "ckpt+offload": ["model.activation_checkpointing=true", "model.activation_offload=true"],
    "ckpt+tiled+offload": ["model.activation_checkpointing=true", "model.mlp_tile_tokens=1024",
                           "model.activation_offload=true"],
}
SHAPES = {"tiny": ["model=tiny"],
          "llama_150m (2 layers)": ["model=llama_150m", "model.num_layers=2"]}
# (shape, seq_len, ranks, knob names). No 64k point: the profiler keeps a record per operator, and
# at 65,536 tokens over 2 ranks its records passed 11 GiB per rank (the torch kernel's tiles), more
# than this 24 GiB machine holds; bench/long_context_cpu.py measures that run by its peak RSS instead.
GRID = ([("tiny", 4096, r, list(KNOBS)) for r in (1, 2)]
        + [("tiny", 16384, 1, ["plain", "ckpt", "ckpt+tiled"]), ("tiny", 16384, 2, list(KNOBS))]
        + [("llama_150m (2 layers)", 4096, 1, ["plain", "ckpt", "tiled", "ckpt+tiled"]),
           ("llama_150m (2 layers)", 4096, 2, list(KNOBS)),
           ("llama_150m (2 layers)", 16384, 2, ["plain", "ckpt+tiled"])])
DRY_GRID = [("tiny", 2048, 2, ["ckpt+tiled"])]

GPUS = {"80 GB": 79.6 * 2**30, "141 GB": 140.4 * 2**30}  # H100 80GB and H200 as the devices report them
USABLE = 0.9
TECHNIQUES = {  # cumulative, as ALST adds them
    "checkpointing": ["model.activation_checkpointing=true"],
    "+ tiled MLP": ["model.activation_checkpointing=true", "model.mlp_tile_tokens=4096"],
    "+ activation offload": ["model.activation_checkpointing=true", "model.mlp_tile_tokens=4096",
                             "model.activation_offload=true"],
}
GPU_BASE = ["kernel=triton", "engine=fsdp2", "engine.mixed_precision=bf16", "model.loss_chunk_tokens=4096"]
# ALST (Arctic Long Sequence Training, Bekman et al. 2025), Llama-3.1-8B, bf16, ZeRO-3, 8 x H100 80GB
# unless noted: the maximum sequence length of each step of their recipe ladder.
ALST = [
    ("tiled loss (dp 8, ZeRO-3, checkpointing)", 8, "none", [], 160e3),
    ("+ Ulysses SP 8", 8, "ulysses", [], 1.1e6),
    ("+ tiled MLP", 8, "ulysses", ["model.mlp_tile_tokens=4096"], 1.2e6),
    ("+ activation checkpoint offload", 8, "ulysses", ["model.mlp_tile_tokens=4096", "model.activation_offload=true"],
     2.4e6),
    ("all (ALST adds allocator fixes)", 8, "ulysses", ["model.mlp_tile_tokens=4096", "model.activation_offload=true"],
     3.8e6),
    ("1 GPU: ZeRO-3 + optimizer and parameter offload", 1, "none",
     ["model.mlp_tile_tokens=4096", "model.activation_offload=true", "engine.offload_optimizer=true",
      "engine.offload_params=true"], 500e3),
]
ALST_BASE = ["model=llama3_8b", "kernel=triton", "engine=deepspeed", "engine.zero_stage=3", "engine.mixed_precision=bf16",
             "model.activation_checkpointing=true", "model.loss_chunk_tokens=4096"]


def measure(shape: str, seq_len: int, ranks: int, knob: str, work: Path) -> dict:
    """One two-step run with the profiler on; the measured and estimated peak of every rank."""
    name = f"m{shape.split()[0]}_{seq_len}_{ranks}_{knob}".replace("+", "_")
    train = ["-m", "lctrain.train", *SHAPES[shape], "data=passkey", f"data.seq_len={seq_len}", "kernel=torch",
             "logger=none", "trainer.steps=2", "trainer.eval_samples=1", "trainer.eval_every=0",
             "trainer.checkpoint_every=0", "trainer.save_final=false", "trainer.progress=false",
             "trainer.num_threads=1", "trainer.memory_profile=true", *KNOBS[knob]]
    if ranks > 1:
        train += ["cp=striped", f"cp.size={ranks}"]
        cmd = [sys.executable, "-m", "lctrain.launch", f"--nproc-per-node={ranks}", *train]
    else:
        cmd = [sys.executable, *train]
    env = {**os.environ, "LCTRAIN_RUN_ID": name, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{shape} {seq_len} x{ranks} {knob}: {proc.stderr[-2000:]}")
    per_rank = [json.loads((work / "outputs" / name / f"memory_rank{r}.json").read_text()) for r in range(ranks)]
    return {"shape": shape, "seq_len": seq_len, "ranks": ranks, "knobs": knob,
            "measured": [r["measured_peak_bytes"] for r in per_rank], "estimated": per_rank[0]["estimate"]["peak"],
            "ratios": [r["ratio"] for r in per_rank], "peak_phase": per_rank[0]["estimate"]["peak_phase"]}


def _reestimate(point: dict) -> dict:
    """A measured point with the current model's estimate (the measurement does not change)."""
    overrides = [*SHAPES[point["shape"]], "data=passkey", f"data.seq_len={point['seq_len']}", "kernel=torch",
                 *KNOBS[point["knobs"]]] + (["cp=striped", f"cp.size={point['ranks']}"] if point["ranks"] > 1 else [])
    est = estimate(compose_config(overrides), point["ranks"])
    return {**point, "estimated": est.peak, "peak_phase": est.peak_phase,
            "ratios": [est.peak / m for m in point["measured"]]}


def max_tokens(overrides: list[str], world: int, capacity: float) -> int:
    """The longest sequence (a multiple of 1024 x cp) whose estimate fits ``capacity`` bytes."""
    cp = next((int(o.split("=")[1]) for o in overrides if o.startswith("cp.size=")), 1)
    base = compose_object(overrides)

    def fits(k: int) -> bool:
        cfg = replace(base, data=replace(base.data, seq_len=k * 1024 * cp))
        return estimate(cfg, world, "cuda").peak <= capacity

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2**22:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * 1024 * cp


def cp_overrides(model: str, cp: int) -> list[str]:
    return [f"model={model}"] + ([] if cp == 1 else ["cp=striped", f"cp.size={cp}"])


def prediction_tables(dry: bool = False) -> tuple[list[dict], list[dict]]:
    """The max-context table and ALST's ladder (``dry``: llama_1b on 80 GB at cp 8, and the ladder)."""
    table = []
    for model in ("llama_1b",) if dry else ("llama_1b", "llama3_8b"):
        for gpu, size in list(GPUS.items())[:1] if dry else GPUS.items():
            for cp in (8,) if dry else (1, 8, 32):
                for technique, knobs in TECHNIQUES.items():
                    tokens = max_tokens(cp_overrides(model, cp) + GPU_BASE + knobs, cp, USABLE * size)
                    table.append({"model": model, "gpu": gpu, "cp": cp, "technique": technique,
                                  "max_tokens": tokens, "tokens_per_gpu": tokens // cp})
    alst = []
    for name, gpus, strategy, knobs, published in ALST:
        overrides = ALST_BASE + knobs + ([f"cp={strategy}", f"cp.size={gpus}"] if strategy != "none" else [])
        for gpu, size in GPUS.items():
            if gpu != "80 GB" and gpus > 1:
                continue  # ALST's multi-GPU figures are for 80 GB GPUs only; one 141 GB GPU has no published figure
            tokens = max_tokens(overrides, gpus, USABLE * size)
            known = published if gpu == "80 GB" else None
            alst.append({"recipe": name if gpu == "80 GB" else name.replace("1 GPU", "1 x 141 GB GPU"), "gpus": gpus,
                         "gpu": gpu, "predicted": tokens, "published": known,
                         "ratio": tokens / known if known else None})
    return table, alst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-measure", action="store_true", help="only the prediction tables")
    parser.add_argument("--reuse-points", type=Path, default=None,
                        help="take the measured points from this earlier memory.json (and re-estimate them)")
    add_output_options(parser, "one tiny 2-rank point at 2048 tokens")
    args = parser.parse_args(argv)
    out = output_dir(args, "memory", RESULTS)
    points = []
    if args.reuse_points:
        points = [_reestimate(p) for p in json.loads(args.reuse_points.read_text())["points"]]
    elif not args.skip_measure:
        with tempfile.TemporaryDirectory() as work:
            for shape, seq, ranks, knobs in (DRY_GRID if args.dry_run else GRID):
                for knob in knobs:
                    p = measure(shape, seq, ranks, knob, Path(work))
                    points.append(p)
                    (out / "memory_points.partial.json").write_text(json.dumps({"points": points}))
                    print(f"{shape:>22} {seq:>6} x{ranks} {knob:>19}: measured "
                          + ", ".join(fmt_bytes(m) for m in p["measured"]) + f"; estimated {fmt_bytes(p['estimated'])}"
                          f" ({p['peak_phase']}); ratio " + ", ".join(f"{r:.3f}" for r in p["ratios"]), flush=True)
    table, alst = prediction_tables(args.dry_run)
    for row in table:
        print(f"{row['model']:>9} {row['gpu']:>6} cp {row['cp']:>2} {row['technique']:>21}: "
              f"{row['max_tokens']:>11,} tokens ({row['tokens_per_gpu']:,} per GPU)")
    for row in alst:
        versus = (f" vs published {row['published']:>11,.0f} (x{row['ratio']:.2f})" if row["published"]
                  else " (no published figure)")
        print(f"ALST {row['recipe']:>56}: predicted {row['predicted']:>11,}{versus}")
    ratios = [r for p in points for r in p["ratios"]]
    record = {"usable_fraction": USABLE, "points": points, "max_context": table, "alst": alst,
              "worst_ratio": max(ratios, key=lambda r: abs(r - 1)) if ratios else None}
    print(f"wrote {write_record(out / 'memory.json', 'memory', record, argv)}")
    (out / "memory_points.partial.json").unlink(missing_ok=True)
    _plot(out / "memory.png", points, table, alst)


def _plot(path: Path, points: list[dict], table: list[dict], alst: list[dict]) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    if points:
        for knob, marker in zip(KNOBS, "osD^vx"):
            xs = [m / 2**20 for p in points if p["knobs"] == knob for m in p["measured"]]
            ys = [p["estimated"] / 2**20 for p in points if p["knobs"] == knob for _ in p["measured"]]
            left.scatter(xs, ys, marker=marker, label=knob, alpha=0.8)
        lim = [min(m for p in points for m in p["measured"]) / 2**20 * 0.8,
               max(m for p in points for m in p["measured"]) / 2**20 * 1.2]
        for factor, style in ((1, "k-"), (0.9, "k:"), (1.1, "k:")):
            left.plot(lim, [v * factor for v in lim], style, lw=0.8)
        left.set(xscale="log", yscale="log", xlabel="measured peak (MiB, profiler)", ylabel="estimated peak (MiB)",
                 title="memory model vs measurement (CPU; dotted: +-10%)")
        left.legend(fontsize=7)
    labels = [r["recipe"].split(" (")[0] for r in alst]
    ys = range(len(alst))
    right.barh([y + 0.2 for y in ys], [r["predicted"] / 1e6 for r in alst], height=0.4, label="lctrain estimate")
    right.barh([y - 0.2 for y in ys], [(r["published"] or 0) / 1e6 for r in alst], height=0.4, label="ALST published")
    right.set_yticks(list(ys), labels, fontsize=7)
    right.invert_yaxis()
    right.set(xlabel="max sequence length (M tokens)", title="Llama-3-8B, 8 x 80 GB (last rows: 1 GPU)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
