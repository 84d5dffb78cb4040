"""Record the curves of a staged passkey recipe (`make passkey`) from its run directories.

Each stage's run directory holds ``metrics.jsonl`` and Hydra's ``.hydra/overrides.yaml``; this
collects per stage its overrides, steps, summed step time, train loss (every 10 steps) and the
eval answer accuracy at every eval, and draws them one stage after another.

    python bench/passkey_stages.py outputs/<stage 1 run> outputs/<stage 2 run> outputs/<stage 3 run>
    python bench/passkey_stages.py --dry-run RUN ...   # output to a temp dir
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lctrain.benchmarking import add_output_options, output_dir, pyplot, write_record

RESULTS = Path(__file__).resolve().parent / "results"


def stage_record(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{run}/metrics.jsonl is empty: pass the run directory of a stage that has trained")
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/answer_acc" in r]
    overrides = run / ".hydra" / "overrides.yaml"
    # Hydra writes the command line's overrides as a YAML list of plain strings, one per line
    listed = [line[2:].strip() for line in overrides.read_text().splitlines() if line.startswith("- ")] \
        if overrides.exists() else []
    return {"run": run.name, "overrides": listed,
            "steps": max(r["step"] for r in train), "step_seconds": sum(r.get("train/step_time_s", 0.0) for r in train),
            "train_loss": [[r["step"], r["train/loss"]] for r in train if r["step"] % 10 == 0],
            "eval_answer_acc": [[r["step"], r["eval/answer_acc"]] for r in evals],
            "chance": evals[-1].get("eval/answer_chance") if evals else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="the stages' run directories, in order")
    add_output_options(parser, "the same record")
    args = parser.parse_args(argv)
    out = output_dir(args, "passkey_stages", RESULTS)
    stages = [stage_record(run) for run in args.runs]
    for s in stages:
        final = f"{100 * s['eval_answer_acc'][-1][1]:.1f}% (chance {100 * s['chance']:.1f}%)" if s["eval_answer_acc"] else "-"
        print(f"{s['run']}: {s['steps']} steps in {s['step_seconds']:.0f} s of steps, final eval accuracy {final}")
    print(f"wrote {write_record(out / 'passkey_stages.json', 'passkey_stages', {'stages': stages}, argv)}")
    plt = pyplot(out / "passkey_stages.png")
    if plt is None:
        return
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for s in stages:
        label = " ".join(o for o in s["overrides"] if o.startswith("experiment=")) or s["run"]
        loss_ax.plot([offset + x for x, _ in s["train_loss"]], [y for _, y in s["train_loss"]], label=label)
        if s["eval_answer_acc"]:
            acc_ax.plot([offset + x for x, _ in s["eval_answer_acc"]], [100 * y for _, y in s["eval_answer_acc"]],
                        marker="o", label=f"{label} (chance {100 * s['chance']:.0f}%)")
        offset += s["steps"]
    loss_ax.set(xlabel="step (stages in sequence)", ylabel="train loss", yscale="log", title="train loss")
    acc_ax.set(xlabel="step (stages in sequence)", ylabel="eval answer accuracy (%)", title="held-out answers")
    for ax in (loss_ax, acc_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "passkey_stages.png", dpi=110)
    print(f"wrote {out / 'passkey_stages.png'}")


if __name__ == "__main__":
    main()
