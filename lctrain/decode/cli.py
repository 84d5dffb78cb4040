"""`lctrain-generate`: greedy decoding from a training checkpoint, KV cache sharded over ranks.

    torchrun --standalone --nproc-per-node=2 -m lctrain.decode.cli \\
        outputs/<run>/checkpoints --prompt "The pass key is" --max-new-tokens 32
    torchrun --standalone --nproc-per-node=2 -m lctrain.decode.cli \\
        outputs/<run> --passkey 8 --seq-len 8192 --decode tree

CHECKPOINT is a `step_XXXXXXXX` directory, a checkpoints directory (its newest
complete step is used) or a run directory (`<run>/checkpoints`). The model
shape and data settings are the ones the checkpoint recorded (or --config); its
files are verified against their recorded SHA-256 before anything is read, DCP's
metadata is unpickled through an allow-list and tensors load with weights_only.
Every process of the launch is one context-parallel rank (gloo on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lctrain.attention import strategy_names
from lctrain.attention.layouts import LAYOUT_NAMES
from lctrain.attention.strategies import get_strategy
from lctrain.build import DTYPES

from .combine import COMBINES, RING_FINISHES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lctrain-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="step_XXXXXXXX directory, checkpoints directory or run directory")
    p.add_argument("--config", help="the run's config.yaml (default: <run>/.hydra/config.yaml)")
    p.add_argument("--prompt", help="text to continue (byte tokenizer / the run's tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--passkey", type=int, default=0, metavar="N", help="decode the answers of N passkey samples")
    p.add_argument("--seq-len", type=int, default=0, help="passkey sequence length (default: the run's data.seq_len)")
    p.add_argument("--decode", choices=list(COMBINES), default="tree")
    p.add_argument("--ring-finish", choices=list(RING_FINISHES), default="broadcast")
    p.add_argument("--prefill", choices=[s for s in strategy_names() if s != "none" and get_strategy(s).decodes],
                   default="tree", help="context-parallel strategy of the prefill")
    p.add_argument("--layout", choices=list(LAYOUT_NAMES), default="striped")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    p.add_argument("--json", help="write the results as JSON to this file (rank 0)")
    args = p.parse_args(argv)
    if not args.prompt and not args.passkey:
        p.error("give --prompt TEXT and/or --passkey N")
    return args


def run_config(step_dir: Path, given: str | None):
    """The config the checkpoint was trained with (recorded in its meta.json), or ``--config``;
    merged onto the typed schema, so a field it lacks takes its default."""
    from omegaconf import OmegaConf

    from lctrain.checkpoint import read_meta
    from lctrain.config import TrainConfig

    saved = OmegaConf.load(given) if given else read_meta(step_dir).get("config")
    if saved is None:
        raise ValueError(f"{step_dir} records no config; pass --config <run dir>/.hydra/config.yaml")
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)


def load_model(step_dir: Path, cfg, dtype: torch.dtype):
    """The Llama of the run's config with the checkpoint's weights: every file's digest is
    verified first, DCP's metadata is read through an allow-list, tensors with weights_only."""
    from lctrain.attention import build_attention
    from lctrain.build import build_model
    from lctrain.checkpoint import load_model_weights

    model = build_model(cfg.model, build_attention("none"), context_len=cfg.data.seq_len)
    load_model_weights(step_dir, model)
    return model.to(dtype).eval()


def run(args) -> dict:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from lctrain.data import PasskeyDataset, build_tokenizer

    from .passkey import passkey_decode_eval
    from .session import generate

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    group = dist.group.WORLD if world > 1 else None
    from lctrain.checkpoint import find_step_dir

    step_dir = find_step_dir(Path(args.checkpoint))
    cfg = run_config(step_dir, args.config)
    data = cfg.data
    tokenizer = build_tokenizer(data.tokenizer, data.tokenizer_path)
    model = load_model(step_dir, cfg, DTYPES[args.dtype])
    settings = {"cp_group": group, "layout": args.layout, "prefill_strategy": args.prefill,
                "decode": args.decode, "ring_finish": args.ring_finish}
    result = {"checkpoint": str(step_dir), "cp_size": world, "dtype": args.dtype,
              **{k: v for k, v in settings.items() if k != "cp_group"}}
    if args.prompt:
        ids = torch.tensor([tokenizer.bos_id, *tokenizer.encode(args.prompt)])
        start = time.perf_counter()
        sessions: list = []
        new = generate(model, ids, args.max_new_tokens, eos_id=tokenizer.eos_id, session_out=sessions, **settings)
        result["prompt"] = {"prompt_tokens": len(ids), "new_ids": new.tolist(),
                            "text": tokenizer.decode(new.tolist()), "wall_s": time.perf_counter() - start,
                            "per_token": sessions[0].counters.per_token()}
    if args.passkey:
        seq_len = args.seq_len or data.seq_len
        dataset = PasskeyDataset.from_config(OmegaConf.merge(data, {"seq_len": seq_len}), tokenizer)
        result["passkey"] = {"seq_len": seq_len, **passkey_decode_eval(model, dataset, args.passkey, **settings)}
    if rank == 0:
        _report(result, args)
    return result


def _report(result: dict, args) -> None:
    head = (f"lctrain-generate: {result['checkpoint']} | cp ranks {result['cp_size']} | prefill "
            f"{result['prefill_strategy']} ({result['layout']}) | decode {result['decode']}")
    print(head, flush=True)
    if "prompt" in result:
        r = result["prompt"]
        print(f"prompt ({r['prompt_tokens']} tokens) -> {len(r['new_ids'])} new tokens in {r['wall_s']:.2f}s: "
              f"{r['text']!r}")
        print(f"per decoded token: {r['per_token']['collectives']:.1f} collectives, "
              f"{r['per_token']['hops']:.1f} sequential hops, {r['per_token']['bytes_sent']:.0f} bytes sent (rank 0)")
    if "passkey" in result:
        r = result["passkey"]
        print(f"passkey decode at {r['seq_len']} tokens, {r['num_samples']} samples: exact keys "
              f"{100 * r['passkey_decode/exact']:.1f}% ({r['num_exact']}/{r['num_samples']}), per-digit "
              f"{100 * r['passkey_decode/digit_acc']:.1f}% (chance 10.0%) | {r['collectives_per_token']:.1f} "
              f"collectives + {r['hops_per_token']:.1f} hops per token | {r['wall_s']:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def main(argv=None) -> None:
    args = parse_args(argv)
    from lctrain.distributed import init_distributed, shutdown_distributed

    finished = False
    try:
        env = init_distributed("cpu")
        threads = args.threads or max(1, (os.cpu_count() or 1) // env.local_world_size)
        torch.set_num_threads(threads)
        run(args)
        finished = True
    except ValueError as err:  # a user mistake: one line naming the fix
        print(f"lctrain-generate: error (rank {os.environ.get('RANK', '0')}): {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        shutdown_distributed(wait_for_peers=finished)
    if env.world_size > 1:
        # Everything is written and every rank has left the group. gloo's C++ threads can still
        # abort the process while the interpreter finalises ("terminate called without an active
        # exception", no Python frame left), failing a finished run: skip finalisation.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
