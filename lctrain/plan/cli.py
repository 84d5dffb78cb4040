"""``lctrain-plan``: every strategy / layout / degree / engine / memory-knob combination for a model,
a sequence length and a cluster, ranked by predicted step time, with memory feasibility, and the
command that runs the best.

    lctrain-plan model=llama3_8b data.seq_len=1048576 cluster=h100 cluster.nodes=4
    lctrain-plan model=llama_1b data.seq_len=262144 cluster=a100 --top 20 --json plan.json --png plan.png

Overrides other than ``cluster=`` / ``cluster.*`` compose the training config exactly as
``lctrain.train`` does (``conf/``), so a model preset, ``model=hf model.path=...`` or any field works.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from lctrain.plan.cluster import ClusterConfig, load_cluster
from lctrain.plan.cost import Candidate, Prediction, predict

ENGINES = ("fsdp2", "deepspeed", "ddp")
KNOBS = ((False, 0, False), (True, 0, False), (True, 4096, False), (True, 4096, True))  # ckpt, tile, offload


def candidates(cl: ClusterConfig, num_heads: int) -> list[Candidate]:
    """Every combination worth ranking on ``cl``'s GPUs: cp degrees that divide the world (powers of
    two), each strategy and layout that differ in balance or traffic, usp with its Ulysses groups
    inside a node, three engines, four memory settings."""
    world = cl.world
    degrees = [d for d in (2 ** i for i in range(world.bit_length())) if world % d == 0]
    layouts = []
    for cp in degrees:
        if cp == 1:
            layouts.append(("none", "contiguous", 1, 1))
            continue
        layouts += [("ring", lay, cp, 1) for lay in ("contiguous", "zigzag", "striped")]
        layouts += [("allgather", "striped", cp, 1), ("ulysses", "contiguous", cp, 1), ("tree", "striped", cp, 1)]
        for u in (d for d in degrees if 1 < d < cp and d <= cl.gpus_per_node and d <= num_heads):
            layouts.append(("usp", "striped", cp, u))
    return [Candidate(s, lay, cp, u, e, ck, tile, off) for s, lay, cp, u in layouts for e in ENGINES
            for ck, tile, off in KNOBS]


def plan(cfg, cl: ClusterConfig) -> list[Prediction]:
    """Predictions for every candidate, feasible ones first by step time."""
    preds = [predict(c, cfg, cl) for c in candidates(cl, cfg.model.num_heads)]
    return sorted(preds, key=lambda p: (p.infeasible is not None, p.step_s, p.memory_bytes))


def command(pred: Prediction, train_overrides: list[str], cl: ClusterConfig) -> str:
    """The launch line of ``pred``'s row (torchrun; multi-node through the rendezvous)."""
    launch = f"torchrun --nproc-per-node={cl.gpus_per_node}"
    if cl.nodes > 1:
        launch += f" --nnodes={cl.nodes} --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500"
    keep = [o for o in train_overrides if not o.startswith(("cp=", "cp.", "engine", "kernel",
                                                              "model.activation_checkpointing",
                                                              "model.mlp_tile_tokens", "model.activation_offload"))]
    return f"{launch} -m lctrain.train {' '.join(keep + pred.candidate.overrides())}"


def _row(p: Prediction) -> str:
    c = p.candidate
    knobs = "+".join(k for k, on in (("ckpt", c.checkpointing), (f"tile{c.mlp_tile}", c.mlp_tile),
                                     ("offload", c.offload)) if on) or "-"
    head = f"{c.label():<22} {c.engine:<9} {knobs:<22}"
    if p.infeasible:
        return f"{head} infeasible: {p.infeasible}"
    return (f"{head} {p.step_s:>9.4g} s {p.tokens_per_gpu_s:>10,.0f} {100 * p.mfu:>5.1f}% "
            f"{p.memory_bytes / 2**30:>7.1f} GiB")


def print_table(preds: list[Prediction], cl: ClusterConfig, cfg, top: int, out=sys.stdout) -> None:
    feasible = [p for p in preds if p.infeasible is None]
    print(f"lctrain-plan: {cfg.model.name} at {cfg.data.seq_len:,} tokens on {cl.nodes} x {cl.gpus_per_node} "
          f"{cl.name} ({cl.world} GPUs, {cl.capacity_bytes / 2**30:.0f} GiB usable each); {len(feasible)} of "
          f"{len(preds)} combinations fit", file=out)
    print(f"{'strategy (degree)':<22} {'engine':<9} {'memory knobs':<22} {'step':>11} {'tok/s/GPU':>10} "
          f"{'MFU':>6} {'memory':>11}", file=out)
    for p in feasible[:top]:
        print(_row(p), file=out)
    shown = {}
    for p in preds:
        if p.infeasible and p.candidate.label() not in shown:
            shown[p.candidate.label()] = p
    if shown:
        print("infeasible (one row per strategy):", file=out)
        for p in list(shown.values())[:top]:
            print("  " + _row(p), file=out)


def _plot(path: Path, cfg, cl: ClusterConfig, best: list[Prediction]) -> None:
    from lctrain.benchmarking import pyplot

    plt = pyplot(path)
    if plt is None:
        return
    seq = cfg.data.seq_len
    lengths = [seq // 8, seq // 4, seq // 2, seq, seq * 2]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for p in best:
        ys = []
        for n in lengths:
            run = replace(cfg, data=replace(cfg.data, seq_len=n))
            q = predict(p.candidate, run, cl)
            ys.append(q.tokens_per_gpu_s if q.infeasible is None else float("nan"))
        ax.plot(lengths, ys, "o-", label=f"{p.candidate.label()} {p.candidate.engine}")
    ax.set(xscale="log", xlabel="sequence length (tokens)", ylabel="predicted tokens/s per GPU",
           title=f"{cfg.model.name} on {cl.world} x {cl.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> None:
    """The console script: prints the plan (a console script's return value would become its
    exit status)."""
    run(argv)


def run(argv=None) -> list[Prediction]:
    """Parse ``argv``, print the plan, write --json / --png; the ranked predictions."""
    parser = argparse.ArgumentParser(prog="lctrain-plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="training overrides, plus cluster=NAME and cluster.FIELD=VALUE")
    parser.add_argument("--top", type=int, default=12, help="feasible rows to print")
    parser.add_argument("--json", type=Path, default=None, help="write every row (and the best command) here")
    parser.add_argument("--png", type=Path, default=None, help="predicted tokens/s per GPU vs sequence length")
    args = parser.parse_args(argv)
    from lctrain.config import compose_config

    try:
        cluster_args = [o for o in args.overrides if o.startswith("cluster")]
        train_args = [o for o in args.overrides if not o.startswith("cluster")]
        cl = load_cluster(cluster_args)
        cfg = OmegaConf.to_object(compose_config(train_args))
        if cfg.model.name == "hf":
            from lctrain.interop.hf import apply_hf_config

            cfg = OmegaConf.structured(cfg)
            apply_hf_config(cfg)
            cfg = OmegaConf.to_object(cfg)
        preds = plan(cfg, cl)
    except ValueError as err:
        print(f"lctrain-plan: error: {err}", file=sys.stderr)
        sys.exit(2)
    print_table(preds, cl, cfg, args.top)
    feasible = [p for p in preds if p.infeasible is None]
    best_command = command(feasible[0], train_args, cl) if feasible else None
    if best_command:
        print(f"best: {best_command}")
    else:
        print("nothing fits: more GPUs (cluster.nodes), a shorter data.seq_len or a smaller model")
    if args.json:
        args.json.write_text(json.dumps({"cluster": vars(cl), "model": cfg.model.name, "seq_len": cfg.data.seq_len,
                                         "best_command": best_command, "rows": [p.as_dict() for p in preds]},
                                        indent=1, default=str))
    if args.png and feasible:
        best = {}  # the fastest row of each strategy family
        for p in feasible:
            best.setdefault(p.candidate.strategy, p)
        _plot(args.png, cfg, cl, list(best.values()))
    return preds


if __name__ == "__main__":
    main()
