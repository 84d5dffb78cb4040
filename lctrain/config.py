"""Typed schemas for every Hydra config group, registered in Hydra's ConfigStore.

conf/train.yaml puts `train_schema` first in its defaults list, so every YAML
file and command-line override is merged onto these dataclasses: an unknown key
or a value of the wrong type fails at composition, before any process group
exists. Checks that need more than one field live in `validate`, which raises
ValueError naming the override that fixes the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 259
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_dim: int = 352
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    activation_checkpointing: bool = False
    # Tokens per cross-entropy chunk: the loss never holds (seq, vocab) logits.
    loss_chunk_tokens: int = 4096


@dataclass
class DataConfig:
    name: str = "passkey"  # passkey | text
    seq_len: int = 4096
    seed: int = 1234
    tokenizer: str = "byte"  # byte | hf (a local tokenizer.json at tokenizer_path)
    tokenizer_path: Optional[str] = None
    # passkey
    docs_per_seq: int = 1
    num_needles: int = 1
    key_digits: int = 5
    # text
    path: Optional[str] = None
    jsonl_key: str = "text"
    # loss weight of the passkey answer tokens relative to the others
    answer_loss_weight: float = 1.0


@dataclass
class CPConfig:
    strategy: str = "none"  # none | ring | allgather | ulysses | usp | tree | disagg
    size: int = 1  # ranks sharing one sequence; world = dp x cp
    layout: str = "contiguous"  # contiguous | zigzag | striped: which tokens each cp rank holds
    check_shapes: bool = True  # one small all-gather per call: mismatched shards fail, never hang
    ulysses_size: int = 1  # usp: Ulysses degree inside groups of consecutive ranks; ring across them
    query_chunk: int = 0  # tree: gathered query tokens per rank per chunk (bounds memory); 0 = all at once
    padding: str = "pad"  # pad: extend to the layout's multiple with masked tokens | none: must divide


@dataclass
class DisaggConfig:
    """cp=disagg: core attention on attention servers (cp.size stays 1; workers are data parallel)."""

    mode: str = "colocated"  # colocated: every rank also serves | dedicated: the last num_servers ranks only serve
    num_servers: int = 1  # dedicated only
    chunk_tokens: int = 0  # query tokens per task before scheduling; 0: whole documents, split only for balance
    ping_pong: bool = True  # two half-batches per micro-batch so transfers overlap the other half's compute
    timeout_s: float = 300.0  # a server dead or stalled this long fails the workers with its rank named
    max_docs: int = 256  # documents per worker per micro-batch (width of the gathered metadata)


@dataclass
class KernelConfig:
    name: str = "torch"  # torch | auto | triton


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 20
    grad_clip: float = 1.0


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    mode: str = "offline"  # wandb: online | offline | disabled
    project: str = "lctrain"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    log_every: int = 1


@dataclass
class TrainerConfig:
    steps: int = 100
    micro_batch_size: int = 1
    grad_accum: int = 1
    dp: int = -1  # -1: world_size // cp.size
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | float64 | bfloat16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    num_threads: int = 0  # torch intra-op threads per rank; 0: cores // local ranks
    eval_every: int = 0  # 0: only at the end
    eval_samples: int = 16
    # Passkey answers greedily decoded with the KV cache sharded over the cp group:
    # none | tree | ring (the combine across cp ranks); decode_eval_samples per eval.
    decode_eval: str = "none"
    decode_eval_samples: int = 4
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    checkpoint_dir: Optional[str] = None  # default: <run dir>/checkpoints
    keep_checkpoints: int = 2
    save_final: bool = False
    resume: str = "none"  # none | auto | <checkpoint directory>
    progress: bool = True
    nan_check: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cp: CPConfig = field(default_factory=CPConfig)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


CP_STRATEGIES = ("none", "ring", "allgather", "ulysses", "usp", "tree", "disagg")
LAYOUTS = ("contiguous", "zigzag", "striped")
KERNELS = ("torch", "auto", "triton")
DTYPES = ("auto", "float32", "float64", "bfloat16")


def _one_of(value, allowed, key):
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not valid; use one of {list(allowed)}, e.g. {key}={allowed[0]}")


def validate(cfg: TrainConfig, world_size: int) -> int:
    """Cross-field checks; returns the data-parallel degree."""
    _one_of(cfg.cp.strategy, CP_STRATEGIES, "cp.strategy")
    _one_of(cfg.cp.layout, LAYOUTS, "cp.layout")
    _one_of(cfg.cp.padding, ("pad", "none"), "cp.padding")
    _one_of(cfg.trainer.decode_eval, ("none", "tree", "ring"), "trainer.decode_eval")
    if cfg.trainer.decode_eval != "none" and (cfg.data.name != "passkey" or cfg.cp.strategy in ("usp", "disagg")):
        raise ValueError(
            f"trainer.decode_eval={cfg.trainer.decode_eval} decodes passkey answers with cp=none/ring/striped/"
            f"zigzag/allgather/ulysses/tree prefill; with data={cfg.data.name}, cp={cfg.cp.strategy} set "
            f"trainer.decode_eval=none"
        )
    _one_of(cfg.kernel.name, KERNELS, "kernel.name")
    _one_of(cfg.trainer.dtype, DTYPES, "trainer.dtype")
    _one_of(cfg.trainer.device, ("auto", "cpu", "cuda"), "trainer.device")
    _one_of(cfg.data.name, ("passkey", "text"), "data.name")
    _one_of(cfg.logger.name, ("none", "wandb"), "logger")
    _one_of(cfg.logger.mode, ("online", "offline", "disabled"), "logger.mode")
    if cfg.cp.size < 1:
        raise ValueError(f"cp.size must be >= 1, got {cfg.cp.size}")
    if cfg.cp.strategy == "none" and cfg.cp.size != 1:
        raise ValueError(f"cp=none needs cp.size=1 (got {cfg.cp.size}); pick a cp strategy or set cp.size=1")
    if cfg.cp.strategy not in ("none", "disagg") and cfg.cp.size < 2:
        raise ValueError(f"cp.strategy={cfg.cp.strategy} needs cp.size >= 2 (one rank is cp=none)")
    dp = cfg.trainer.dp if cfg.trainer.dp > 0 else world_size // cfg.cp.size
    if cfg.cp.strategy == "disagg":
        dp = _check_disagg(cfg, world_size)
    if cfg.cp.strategy != "disagg" and dp * cfg.cp.size != world_size:
        launch = max(dp, 1) * cfg.cp.size
        raise ValueError(
            f"world size {world_size} != dp ({dp}) x cp ({cfg.cp.size}); launch "
            f"{launch} processes (torchrun --nproc-per-node={launch}) or set trainer.dp=-1 "
            f"and a cp.size that divides {world_size}"
        )
    m = cfg.model
    if m.dim % m.num_heads or m.num_heads % m.num_kv_heads or (m.dim // m.num_heads) % 2:
        raise ValueError(
            f"model.dim ({m.dim}) / model.num_heads ({m.num_heads}) must be an even head_dim and "
            f"num_heads must divide by model.num_kv_heads ({m.num_kv_heads})"
        )
    _check_cp_heads_and_length(cfg)
    for key in ("steps", "micro_batch_size", "grad_accum", "eval_samples", "keep_checkpoints"):
        if getattr(cfg.trainer, key) < 1:
            raise ValueError(f"trainer.{key} must be >= 1, got {getattr(cfg.trainer, key)}")
    if cfg.data.seq_len < 2:
        raise ValueError(f"data.seq_len must be >= 2, got {cfg.data.seq_len}")
    if cfg.data.name == "text" and not cfg.data.path:
        raise ValueError("data=text needs data.path=<file, directory or glob of .txt/.jsonl files>")
    if cfg.data.tokenizer == "hf" and not cfg.data.tokenizer_path:
        raise ValueError("data.tokenizer=hf needs data.tokenizer_path=<local tokenizer.json>")
    if cfg.optim.lr <= 0 or not 0 <= cfg.optim.min_lr_ratio <= 1 or len(cfg.optim.betas) != 2:
        raise ValueError("optim: need lr > 0, 0 <= min_lr_ratio <= 1 and two betas, e.g. optim.betas=[0.9,0.95]")
    return dp


def _check_cp_heads_and_length(cfg: TrainConfig) -> None:
    """Head sharding of ulysses/usp and the sequence length every layout can deal."""
    from lctrain.attention.ulysses import usable_degrees
    from lctrain.distributed.groups import check_degrees

    cp, m = cfg.cp, cfg.model
    degree = {"ulysses": cp.size, "usp": cp.ulysses_size}.get(cp.strategy, 1)
    if cp.strategy == "usp":
        check_degrees(cp.size, 1, cp.size, cp.ulysses_size)
    if degree not in usable_degrees(m.num_heads, m.num_kv_heads):
        raise ValueError(
            f"cp={cp.strategy} splits heads {degree} ways: model.num_heads ({m.num_heads}) must divide by "
            f"it and model.num_kv_heads ({m.num_kv_heads}) divide it or by it; Ulysses degrees that work: "
            f"{usable_degrees(m.num_heads, m.num_kv_heads)} (or use cp=striped)"
        )
    if cp.strategy in ("none", "disagg"):
        return
    multiple = 2 * cp.size if cp.layout == "zigzag" else cp.size
    if cfg.data.seq_len < cp.size:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} is shorter than cp.size={cp.size}: some cp rank would hold "
            f"only padding; use data.seq_len >= {cp.size} or a smaller cp.size"
        )
    if cp.padding == "none" and cfg.data.seq_len % multiple:
        raise ValueError(
            f"cp.layout={cp.layout} over cp.size={cp.size} deals sequences in multiples of {multiple}, "
            f"and data.seq_len={cfg.data.seq_len} is not one; set data.seq_len="
            f"{-(-cfg.data.seq_len // multiple) * multiple} or cp.padding=pad (masked padding tokens)"
        )


def _check_disagg(cfg: TrainConfig, world_size: int) -> int:
    """cp=disagg settings; returns the number of (data-parallel) worker ranks."""
    d = cfg.disagg
    if cfg.cp.size != 1:
        raise ValueError(f"cp=disagg keeps cp.size=1 (each worker holds whole sequences), got {cfg.cp.size}; "
                         f"set cp.size=1")
    _one_of(d.mode, ("colocated", "dedicated"), "disagg.mode")
    if d.mode == "dedicated" and not 1 <= d.num_servers < world_size:
        raise ValueError(f"disagg.mode=dedicated needs 1 <= disagg.num_servers < world size ({world_size}), got "
                         f"{d.num_servers}; launch more processes or lower disagg.num_servers")
    if d.timeout_s <= 0 or d.max_docs < 1 or d.chunk_tokens < 0:
        raise ValueError(f"disagg: need timeout_s > 0, max_docs >= 1 and chunk_tokens >= 0 (0 = whole documents), "
                         f"got {d.timeout_s}, {d.max_docs}, {d.chunk_tokens}")
    workers = world_size - d.num_servers if d.mode == "dedicated" else world_size
    if cfg.trainer.dp > 0 and cfg.trainer.dp != workers:
        raise ValueError(f"cp=disagg trains data parallel over its {workers} worker ranks; set trainer.dp=-1 "
                         f"(got trainer.dp={cfg.trainer.dp})")
    return workers


def run_id() -> str:
    """Name of the run directory, identical on every rank of one launch.

    Hydra's ${now:} is evaluated in each process and can differ across ranks by
    a second, so the launchers export LCTRAIN_RUN_ID; torchrun's rendezvous id
    and SLURM's job id are the fallbacks that every rank also shares.
    """
    if os.environ.get("LCTRAIN_RUN_ID"):
        return os.environ["LCTRAIN_RUN_ID"]
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("lctrain_run_id"):
        OmegaConf.register_new_resolver("lctrain_run_id", run_id, use_cache=True)
        # Only rank 0 writes Hydra's .hydra/ snapshot into the shared run directory.
        OmegaConf.register_new_resolver(
            "lctrain_hydra_subdir", lambda: ".hydra" if os.environ.get("RANK", "0") == "0" else None
        )


def compose_config(overrides=()):
    """The composed, typed training config for `overrides`, as the CLI would build it
    (for notebooks and tests; the CLI itself goes through hydra.main)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="lctrain.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))
