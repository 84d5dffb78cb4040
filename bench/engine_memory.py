"""Model state per rank under each engine, counted from real shards (no GPU, no weights).

For each model and rank count N the model is built on the meta device (shapes only) and the
engine is applied as the trainer applies it, over a process group of N ranks that exchanges
nothing (torch's "fake" backend): ``engine=fsdp2`` then leaves each parameter's real local
shard on rank 0 (the largest: shards are ceil(rows / N) rows), and ``engine=ddp`` the whole
model. State is counted as the trainer holds it in fp32: parameters 4 B, gradients 4 B and
AdamW's two moments 8 B per element held, plus one step counter per parameter tensor. Next to
each count: the textbook figure 16 B x parameters / N (ZeRO-3 / FSDP) or 16 B x parameters.

``engine=deepspeed`` (ZeRO stage 1, 2, 3) cannot be built on meta tensors (it flattens real
buffers), so its rows apply DeepSpeed's partitioning rule (``zero_state_bytes``: flat groups
padded to 2 x N for stages 1 / 2, each tensor rounded up for stage 3) to the same parameter
tensors; the suite checks that rule against what a real 2- and 4-rank DeepSpeed run allocates.
DeepSpeed keeps an fp32 master copy of its partition even for fp32 weights, so in fp32 ZeRO-3
holds 20 B / N per parameter; with ``engine.mixed_precision=bf16`` (2 B weights and gradients)
it is the textbook 16 B / N, shown as ``zero3-bf16``. Stage 1's gradients are the whole ones it
holds through the backward (it reduces them at the accumulation boundary).

    python bench/engine_memory.py             # llama_1b and llama3_8b at N = 8, 64, 512
    python bench/engine_memory.py --dry-run   # tiny at N = 2, 4, output to a temp dir
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from lctrain.attention.strategies.base import LocalAttention
from lctrain.benchmarking import add_output_options, fmt_bytes, output_dir, pyplot, write_record
from lctrain.build import model_shape
from lctrain.config import compose_config
from lctrain.engines.deepspeed import zero_state_bytes
from lctrain.models.llama import Llama

RESULTS = Path(__file__).resolve().parent / "results"
BYTES_PER_ELEMENT = {"params": 4, "grads": 4, "optimizer": 8}  # fp32 weights, gradients, AdamW moments
STEP_COUNTER_BYTES = 4


def _meta_model(name: str) -> Llama:
    cfg = compose_config([f"model={name}"])
    with torch.device("meta"):
        return Llama(model_shape(cfg.model), LocalAttention("torch"))


def state_per_rank(model_name: str, engine: str, ranks: int) -> dict:
    """Bytes rank 0 holds for ``model_name`` under ``engine`` over ``ranks`` ranks."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    try:
        model = _meta_model(model_name)
        total = sum(p.numel() for p in model.parameters())
        if engine == "fsdp2":
            mesh = init_device_mesh("cpu", (ranks,))
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh, reshard_after_forward=False)
        held = [p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()]
    finally:
        dist.destroy_process_group()
    out = {key: sum(held) * size for key, size in BYTES_PER_ELEMENT.items()}
    out["optimizer"] += STEP_COUNTER_BYTES * len(held)
    out["total"] = sum(out.values())
    formula = 16 * total / (ranks if engine == "fsdp2" else 1)
    return {"model": model_name, "engine": engine, "ranks": ranks, "parameters": total, **out,
            "formula_bytes": formula, "ratio_to_formula": out["total"] / formula}


DEEPSPEED = {"zero1": (1, 4), "zero2": (2, 4), "zero3": (3, 4), "zero3-bf16": (3, 2)}  # stage, weight bytes


def deepspeed_state_per_rank(model_name: str, engine: str, ranks: int) -> dict:
    """Bytes one rank holds under DeepSpeed ZeRO (``DEEPSPEED`` names) by its partitioning rule."""
    numels = [p.numel() for p in _meta_model(model_name).parameters()]
    stage, weight_bytes = DEEPSPEED[engine]
    out = zero_state_bytes(numels, ranks, stage, weight_bytes)
    out["total"] = sum(out.values())
    total = sum(numels)
    # The ZeRO paper's fp32 accounting: whole weights + whole (1) or sharded (2) gradients + sharded
    # AdamW; stage 3 shards all 16 B.
    formula = {1: 8 * total + 8 * total / ranks, 2: 4 * total + 12 * total / ranks, 3: 16 * total / ranks}[stage]
    return {"model": model_name, "engine": engine, "ranks": ranks, "parameters": total, **out,
            "formula_bytes": formula, "ratio_to_formula": out["total"] / formula}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama_1b", "llama3_8b"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 64, 512])
    add_output_options(parser, "the tiny model at 2 and 4 ranks")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.models, args.ranks = ["tiny"], [2, 4]
    out = output_dir(args, "engine_memory", RESULTS)
    rows = [state_per_rank(m, e, n) for m in args.models for e in ("ddp", "fsdp2") for n in args.ranks]
    rows += [deepspeed_state_per_rank(m, e, n) for m in args.models for e in DEEPSPEED for n in args.ranks]
    for r in rows:
        print(f"{r['model']:>10} {r['engine']:>10} N={r['ranks']:<4} params {fmt_bytes(r['params']):>10} "
              f"grads {fmt_bytes(r['grads']):>10} optimizer {fmt_bytes(r['optimizer']):>10} total "
              f"{fmt_bytes(r['total']):>10} (formula {fmt_bytes(int(r['formula_bytes']))}, "
              f"x{r['ratio_to_formula']:.4f})")
    path = write_record(out / "engine_memory.json", "engine_memory", {"rows": rows}, argv)
    print(f"wrote {path}")
    plt = pyplot(out / "engine_memory.png")
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(args.models), figsize=(5.5 * len(args.models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], args.models):
        for engine, style in (("ddp", "s--"), ("fsdp2", "o-"), ("zero1", "v:"), ("zero2", "^:"), ("zero3", "D-."),
                              ("zero3-bf16", "x-")):
            pts = [r for r in rows if r["model"] == model and r["engine"] == engine]
            ax.plot([r["ranks"] for r in pts], [r["total"] / 2**30 for r in pts], style, label=engine)
        ax.set(xscale="log", yscale="log", xlabel="ranks holding the model (dp x cp)",
               ylabel="GiB per rank (fp32 params + grads + AdamW)", title=model)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "engine_memory.png", dpi=110)
    print(f"wrote {out / 'engine_memory.png'}")


if __name__ == "__main__":
    main()
