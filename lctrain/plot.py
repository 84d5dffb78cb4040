"""`lctrain-plot RUN_DIR`: the curves of a run from its metrics.jsonl, as RUN_DIR/curves.png.

Three panels: training loss (and eval loss), the eval answer accuracy next to its chance
level, and tokens/s. The trainer draws it at the end of every run (rank 0); this command
redraws it at any time, also while the run goes on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: point lctrain-plot at a run directory (outputs/<run id>)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: Path, out: Path | None = None, title: str | None = None) -> Path:
    """Draw RUN_DIR/curves.png (or ``out``) from the run's metrics; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    fig, (loss_ax, acc_ax, speed_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    steps, loss = _series(rows, "train/loss")
    loss_ax.plot(steps, loss, lw=1, label="train")
    eval_steps, eval_loss = _series(rows, "eval/loss")
    if eval_steps:
        loss_ax.plot(eval_steps, eval_loss, "o-", label="eval")
    loss_ax.set(xlabel="step", ylabel="loss (nats / target token)", title="loss")
    loss_ax.legend()
    acc_steps, acc = _series(rows, "eval/answer_acc")
    if acc_steps:
        acc_ax.plot(acc_steps, [100 * a for a in acc], "o-", label="eval answer accuracy")
        _, chance = _series(rows, "eval/answer_chance")
        if chance:
            acc_ax.axhline(100 * chance[-1], color="gray", ls="--", label=f"chance {100 * chance[-1]:.2g}%")
        acc_ax.legend()
    acc_ax.set(xlabel="step", ylabel="%", title="eval metric", ylim=(0, 100))
    speed_steps, speed = _series(rows, "train/tokens_per_s")
    speed_ax.plot(speed_steps, speed, lw=1)
    speed_ax.set(xlabel="step", ylabel="tokens / s", title="throughput")
    fig.suptitle(title or Path(run_dir).name)
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lctrain-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="image path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {plot_run(args.run_dir, args.out)}")
    except ValueError as err:
        raise SystemExit(f"lctrain-plot: error: {err}") from None


if __name__ == "__main__":
    main()
