"""Attention kernel throughput on one GPU: lctrain's Triton kernels vs torch SDPA and FlexAttention.

TFLOP/s follow the FlashAttention convention: forward = 4 * batch * sq * sk * d * h, halved
when causal (packed documents: 4 * d * h * the exact number of visible pairs); backward = 2.5x
forward; fwd+bwd = 3.5x. bf16, head dims 64 and 128 with h * d = 2048, causal and not, seq 1k..64k
at batch * seq = 16k tokens (batch 1 beyond 16k), 128k forward only, and a packed-documents case
(log-normal document lengths, median 256, sigma 1.5, in one 16k sequence; causal).

Baselines, same shapes: torch SDPA with each backend (FLASH_ATTENTION, CUDNN_ATTENTION,
EFFICIENT_ATTENTION; a backend that refuses a shape is recorded with its reason; packed
documents go through EFFICIENT with a boolean mask) and torch.compile'd flex_attention with a
causal / document block mask. Timed with triton.testing.do_bench (median ms).

    python bench/kernels.py                       # full run: bench/results/kernels.{json,png}
    python bench/kernels.py --seqs 1024 4096 --dims 128
    python bench/kernels.py --targets             # the issue's targets only, with verdicts (minutes)
    python bench/kernels.py --dry-run             # CPU, Triton interpreter, tiny shapes, no files
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from lctrain.attention.balance import docs_from_lengths, lognormal_doc_lengths  # noqa: E402
from lctrain.benchmarking import pyplot, write_record  # noqa: E402
from lctrain_kernels.mask import Coords, Mask  # noqa: E402
from lctrain_kernels.triton.attention import triton_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN = 2048
TOKENS = 16384


def packed_docs(seq_len: int) -> torch.Tensor:
    """Document ids of log-normal documents (median 256, sigma 1.5, seed 0) filling ``seq_len``."""
    return torch.from_numpy(docs_from_lengths(lognormal_doc_lengths(seq_len, seed=0, median=256.0, sigma=1.5)))


def flops_fwd(batch, seq, heads, dim, causal, doc=None) -> float:
    if doc is not None:  # exact visible pairs of a causal packed sequence
        lengths = torch.bincount(doc).double()
        return 4.0 * batch * heads * dim * float((lengths * (lengths + 1) / 2).sum())
    return 4.0 * batch * seq * seq * heads * dim / (2 if causal else 1)


def make_timer(dry_run: bool):
    if dry_run:
        def bench(fn):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return bench
    from triton.testing import do_bench
    return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")


def triton_runner(q, k, v, doc, causal):
    """Through autograd like the baselines: the forward plans the tiles, the backward reuses it."""
    pos = torch.arange(q.shape[1], device=q.device)
    coords = Coords(pos, torch.zeros_like(pos) if doc is None else doc.to(q.device))
    mask = Mask(causal=causal)
    return autograd_runner(lambda a, b, c: triton_attention(a, b, c, coords, coords, mask)[0], q, k, v)


def autograd_runner(forward, q, k, v):
    """(fwd, bwd) callables for an autograd attention forward(q, k, v) -> out."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = forward(q, k, v)
    dout = torch.randn_like(out)
    return (lambda: forward(q, k, v)), (lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))


def sdpa_runner(backend_name, q, k, v, doc, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    backend = getattr(SDPBackend, backend_name)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (b, h, s, d)
    mask = None
    if doc is not None:
        if backend_name != "EFFICIENT_ATTENTION":
            raise RuntimeError("no arbitrary-mask support: packed documents need EFFICIENT_ATTENTION")
        doc = doc.to(q.device)
        idx = torch.arange(len(doc), device=q.device)
        mask = (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])

    def forward(a, b, c):
        with sdpa_kernel([backend]):
            return sdpa(a, b, c, attn_mask=mask, is_causal=causal and mask is None)

    return autograd_runner(forward, qt, kt, vt)


def flex_runner(q, k, v, doc, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seq = q.shape[1]
    doc = None if doc is None else doc.to(q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        return keep if doc is None else keep & (doc[q_idx] == doc[kv_idx])

    block_mask = create_block_mask(mask_mod, None, None, seq, seq, device=q.device) if causal else None
    compiled = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return autograd_runner(lambda a, b, c: compiled(a, b, c, block_mask=block_mask), qt, kt, vt)


# The targets on H100, bf16: (shape, metric, baseline or None for absolute TFLOP/s, bound).
TARGETS = [
    ("d128 causal 16k", "fwd", None, 450.0),
    ("d128 causal 16k", "fwdbwd", "sdpa_flash", 1.2),
    ("d128 causal 16k", "fwdbwd", "flex", 1.0),
    ("d128 docs 16k", "fwdbwd", "flex", 1.0),
]


def target_shapes(args):
    heads = max(1, args.hidden // 128)
    for docs in (False, True):
        yield dict(dim=128, heads=heads, causal=True, seq=args.target_seq, batch=1, docs=docs, fwd_only=False,
                   name=f"d128 {'docs' if docs else 'causal'} 16k")


def check_targets(rows) -> list[dict]:
    verdicts = []
    for name, metric, baseline, bound in TARGETS:
        res = next(r["results"] for r in rows if r.get("name") == name)
        ours = res.get("triton", {}).get(f"{metric}_tflops")
        other = res.get(baseline, {}).get(f"{metric}_tflops") if baseline else None
        value = ours if baseline is None else (ours / other if ours and other else None)
        verdicts.append(dict(shape=name, metric=metric, baseline=baseline, bound=bound, value=value,
                             met=None if value is None else value >= bound))
        unit = "TFLOP/s" if baseline is None else f"x {baseline}"
        shown = "n/a" if value is None else f"{value:.2f}"
        print(f"target {name} {metric}: {shown} {unit} (need >= {bound}): "
              f"{'n/a' if value is None else 'met' if value >= bound else 'MISSED'}")
    return verdicts


def shapes(args):
    for dim in args.dims:
        heads = max(1, args.hidden // dim)
        for causal in (True, False):
            for seq in args.seqs:
                yield dict(dim=dim, heads=heads, causal=causal, seq=seq, batch=max(1, args.tokens // seq),
                           docs=False, fwd_only=seq > args.bwd_max_seq)
        yield dict(dim=dim, heads=heads, causal=True, seq=args.packed_seq, batch=1, docs=True, fwd_only=False)


def measure(shape, args, timer, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    b, s, h, d = shape["batch"], shape["seq"], shape["heads"], shape["dim"]
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
    doc = packed_docs(s) if shape["docs"] else None
    fwd_flops = flops_fwd(b, s, h, d, shape["causal"], doc)
    runners = {"triton": lambda: triton_runner(q, k, v, doc, shape["causal"])}
    for backend in args.sdpa_backends:
        runners[f"sdpa_{backend.split('_')[0].lower()}"] = (
            lambda backend=backend: sdpa_runner(backend, q, k, v, doc, shape["causal"]))
    if not args.no_flex:
        runners["flex"] = lambda: flex_runner(q, k, v, doc, shape["causal"])
    results = {}
    for name, make in runners.items():
        try:
            fwd, bwd = make()
            row = {"fwd_ms": timer(fwd)}
            if not shape["fwd_only"]:
                row["bwd_ms"] = timer(bwd)
                row["fwdbwd_ms"] = row["fwd_ms"] + row["bwd_ms"]
            for key, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
                if f"{key}_ms" in row:
                    row[f"{key}_tflops"] = mult * fwd_flops / (row[f"{key}_ms"] * 1e-3) / 1e12
        except Exception as err:  # unsupported backend / shape / out of memory: record why
            row = {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[name] = row
    return dict(shape, fwd_flops=fwd_flops, results=results)


def label(shape) -> str:
    kind = "docs" if shape["docs"] else ("causal" if shape["causal"] else "full")
    return f"d{shape['dim']} {kind:6s} b{shape['batch']:<3d} s{shape['seq']}"


def print_table(rows):
    print(f"{'shape':30s} {'pass':7s} {'triton':>8s} {'flash':>8s} {'cudnn':>8s} {'effic':>8s} {'flex':>8s}"
          f" {'/flash':>7s} {'/flex':>7s}   (TFLOP/s)")
    for row in rows:
        res = row["results"]
        for key in ("fwd", "bwd", "fwdbwd"):
            if f"{key}_tflops" not in res.get("triton", {}):
                continue
            vals = {n: res.get(n, {}).get(f"{key}_tflops") for n in
                    ("triton", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex")}
            ratio = lambda other: (f"{vals['triton'] / vals[other]:7.2f}" if vals[other] else f"{'-':>7s}")  # noqa
            cells = " ".join(f"{v:8.1f}" if v else f"{'-':>8s}" for v in vals.values())
            print(f"{label(row):30s} {key:7s} {cells} {ratio('sdpa_flash')} {ratio('flex')}")


def plot(rows, path: Path):
    plt = pyplot(path)
    if plt is None:
        return

    groups = sorted({(r["dim"], r["causal"]) for r in rows if not r["docs"]})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (dim, causal) in zip(axes[0], groups):
        sel = [r for r in rows if r["dim"] == dim and r["causal"] == causal and not r["docs"]]
        for name in ("triton", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"):
            pts = [(r["seq"], r["results"].get(name, {}).get("fwdbwd_tflops")) for r in sel]
            pts = [(s, t) for s, t in pts if t]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"fwd+bwd, d={dim}, {'causal' if causal else 'non-causal'}, bf16")
        ax.set_xlabel("sequence length (batch x seq = 16k)")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_targets(rows, path: Path):
    plt = pyplot(path)
    if plt is None:
        return

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        names = [n for n, r in row["results"].items() if "fwd_tflops" in r]
        for offset, key in ((-0.2, "fwd"), (0.2, "fwdbwd")):
            ax.bar([i + offset for i in range(len(names))],
                   [row["results"][n].get(f"{key}_tflops", 0) for n in names], width=0.4, label=key)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_title(f"{row['name']}, bf16")
        ax.set_ylabel("TFLOP/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=TOKENS, help="batch * seq (batch >= 1)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="heads = hidden // head_dim")
    parser.add_argument("--bwd-max-seq", type=int, default=65536, help="longer sequences: forward only")
    parser.add_argument("--packed-seq", type=int, default=16384)
    parser.add_argument("--sdpa-backends", nargs="*",
                        default=["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--target-seq", type=int, default=16384, help=argparse.SUPPRESS)
    parser.add_argument("--targets", action="store_true",
                        help="only the issue's target shapes (d128 causal 16k, packed docs 16k) against SDPA flash "
                             "and Flex, with a verdict per target: bench/results/kernels_targets.json (a few minutes)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU + Triton interpreter, tiny shapes, fp32, no SDPA backends/flex, no files")
    args = parser.parse_args(argv)

    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        args.seqs, args.dims, args.tokens, args.packed_seq, args.hidden = [32, 64], [64], 64, 64, 64
        args.target_seq = 64
        args.sdpa_backends, args.no_flex = [], True
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --dry-run)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    timer = make_timer(args.dry_run)
    if args.targets:
        args.sdpa_backends = [b for b in args.sdpa_backends if b == "FLASH_ATTENTION"]
    rows = []
    for shape in (target_shapes(args) if args.targets else shapes(args)):
        rows.append(measure(shape, args, timer, device, dtype))
        print(label(shape), {n: round(r.get("fwd_tflops", 0), 1) if "skipped" not in r else "skip"
                             for n, r in rows[-1]["results"].items()}, flush=True)
    print_table(rows)
    fields = {"dtype": str(dtype), "flops_convention": "fwd 4*b*sq*sk*d*h (/2 causal), bwd 2.5x, fwd+bwd 3.5x",
              "dry_run": args.dry_run, "results": rows}
    if args.targets:
        fields["targets"] = check_targets(rows)
    if args.dry_run:
        print(f"dry run: {len(rows)} shapes, JSON not written")
        return 0
    stem = "kernels_targets" if args.targets else "kernels"
    path = write_record(args.out / f"{stem}.json", stem, fields, argv, extra_modules=("triton",))
    (plot_targets if args.targets else plot)(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
