"""``lctrain-export CHECKPOINT OUT_DIR``: a checkpoint of any engine as a Hugging Face directory.

    lctrain-export outputs/<run> exported/ --dtype bf16
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exported')"

CHECKPOINT is a ``step_XXXXXXXX`` directory, a checkpoints directory or a run directory (its
newest complete checkpoint); every file's digest is verified before anything is read. The
weights are the consolidated ones every engine writes; config.json carries the RoPE parameters
the run trained with and ``max_position_embeddings`` = its ``data.seq_len``; the tokenizer files
are copied from the run's ``data.tokenizer_path`` (or the imported ``model.path``) when present.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def tokenizer_files(cfg) -> tuple[Path, ...]:
    dirs = []
    if cfg.data.tokenizer == "hf" and cfg.data.tokenizer_path:
        dirs.append(Path(cfg.data.tokenizer_path).parent)
    if cfg.model.name == "hf" and cfg.model.path:
        dirs.append(Path(cfg.model.path))
    for d in dirs:
        found = tuple(d / name for name in TOKENIZER_FILES if (d / name).is_file())
        if found:
            return found
    return ()


def export(checkpoint: str, out_dir: str, dtype: str = "bf16") -> Path:
    import torch

    from lctrain.checkpoint import find_step_dir
    from lctrain.decode.cli import load_model, run_config
    from lctrain.interop.hf import export_hf

    step_dir = find_step_dir(Path(checkpoint))
    cfg = run_config(step_dir, None)
    model = load_model(step_dir, cfg, torch.float32)
    return export_hf(model, cfg.model, cfg.data.seq_len, out_dir, dtype, tokenizer_files(cfg))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lctrain-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="step directory, checkpoints directory or run directory")
    parser.add_argument("out_dir", help="the Hugging Face directory to write (replaced whole)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out_dir, args.dtype)
    except ValueError as err:
        print(f"lctrain-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} (load it with transformers' from_pretrained)")


if __name__ == "__main__":
    main()
