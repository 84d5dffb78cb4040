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
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class RopeScalingConfig:
    """RoPE scaling for context extension (lctrain.models.rope): none | linear | dynamic | yarn | llama3."""

    type: str = "none"
    factor: float = 1.0
    original_max_len: int = 0  # the pretraining context (yarn, llama3, dynamic)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn: cos / sin scale; 0: 0.1 ln(factor) + 1
    truncate: bool = True  # yarn


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
    checkpoint_every: int = 1  # with activation_checkpointing: checkpoint every k-th block (selective)
    activation_offload: bool = False  # with activation_checkpointing: checkpointed inputs in host memory
    # Tokens per cross-entropy chunk: the loss never holds (seq, vocab) logits.
    loss_chunk_tokens: int = 4096
    window: int = 0  # sliding-window attention over this many tokens (every strategy and kernel); 0: none
    qkv_bias: bool = False  # biases on the q / k / v projections (Qwen2)
    mlp_tile_tokens: int = 0  # > 0: the MLP over tiles of this many tokens (recomputed): peak intermediate one tile
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # model=hf: a Hugging Face model directory (config.json + safetensors); its shape replaces the fields above
    path: Optional[str] = None


@dataclass
class DataConfig:
    name: str = "passkey"  # passkey | recall | copy | text
    seq_len: int = 4096
    seed: int = 1234
    tokenizer: str = "byte"  # byte | hf (a local tokenizer.json at tokenizer_path)
    tokenizer_path: Optional[str] = None
    # passkey
    docs_per_seq: int = 1
    num_needles: int = 1
    key_digits: int = 5
    filler: str = "sentences"  # sentences | words: what the needles hide in
    # copy
    copy_distance: int = 0  # tokens between a token and its copy; 0: the largest odd that fits twice
    copy_alphabet: int = 4096  # random token ids after the tokenizer's (chance: 1/copy_alphabet)
    copy_curriculum_samples: int = 0  # documents grow from copy_min_doc_len to seq_len over these samples
    copy_min_doc_len: int = 256
    copy_tokens: str = "fresh"  # fresh: ids after the tokenizer's | text: its digits and letters (<= 62)
    # recall
    recall_classes: int = 16  # needles (and queries) per document, one per class
    recall_values: int = 64  # values a needle can carry (chance: 1/recall_values)
    recall_curriculum_samples: int = 0  # documents grow from recall_min_doc_len to seq_len over these samples
    recall_min_doc_len: int = 128
    # text
    path: Optional[str] = None
    jsonl_key: str = "text"
    # loss weight of the passkey answer tokens relative to the others
    answer_loss_weight: float = 1.0


@dataclass
class CPConfig:
    strategy: str = "none"  # a registered strategy: none | ring | allgather | ulysses | usp | tree | disagg
    size: int = 1  # ranks sharing one sequence; world = dp x cp
    layout: str = "contiguous"  # contiguous | zigzag | striped: which tokens each cp rank holds
    check_shapes: bool = True  # one small all-gather per step: mismatched shards fail, never hang
    count: bool = False  # per-rank pair / byte / message counters (tests, benchmarks); off: no counting work
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
class EngineConfig:
    """How model state is held across the model group's ranks (lctrain.engines)."""

    name: str = "ddp"  # ddp: replicated, gradients summed by DDP | fsdp2: sharded with fully_shard
    bucket_mb: float = 25.0  # ddp: gradient bucket size (all-reduced while the backward runs)
    reshard_after_forward: bool = True  # fsdp2: free gathered weights after a block's forward
    mixed_precision: str = "none"  # fsdp2: none | bf16 | fp16 compute weights (gradients reduced in fp32)
    cpu_offload: bool = False  # fsdp2: keep parameter, gradient and optimizer shards in host memory
    zero_stage: int = 2  # deepspeed: 1 optimizer state | 2 + gradients | 3 + parameters sharded
    offload_optimizer: bool = False  # deepspeed: optimizer state (and its step) in host memory
    offload_params: bool = False  # deepspeed, zero_stage=3: parameter shards in host memory
    ds_config: Dict[str, Any] = field(default_factory=dict)  # deepspeed: merged over the generated JSON


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
    checkpoint_every: int = 500  # 0: no periodic checkpoints (a stop request still saves one)
    checkpoint_dir: Optional[str] = None  # default: <run dir>/checkpoints
    keep_checkpoints: int = 2  # of this run; another run's checkpoints are never touched
    save_final: bool = True
    # auto: continue from the newest verified checkpoint in checkpoint_dir (a fresh start when there
    # is none) | none: start fresh, refused when checkpoint_dir already holds checkpoints | <step dir>
    resume: str = "auto"
    # Warm start: a fresh run (nothing to resume) begins from the model weights of this checkpoint
    # (a step directory, a checkpoints directory or a run directory); optimizer and data start anew.
    init_from: Optional[str] = None
    resume_allow_changes: List[str] = field(default_factory=list)  # e.g. [trainer.steps,data.seq_len]
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # save and stop on these
    max_wall_s: float = 0.0  # stop, save and exit after this many seconds of training; 0: no limit
    comm_timeout_s: float = 300.0  # a collective waiting this long fails the job, naming stalled ranks
    first_step_timeout_s: float = 1800.0  # the same for set-up and the first step (compiles, data)
    progress: bool = True
    memory_check: bool = True  # stop at start-up when the memory estimate exceeds the device's memory
    memory_profile: bool = False  # measure the first 2 steps' peak tensor bytes (profiler; slow)
    nan_check: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cp: CPConfig = field(default_factory=CPConfig)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _one_of(value, allowed, key):
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not valid; use one of {list(allowed)}, e.g. {key}={allowed[0]}")


def _check_deepspeed(cfg) -> None:
    ec = cfg.engine
    _one_of(ec.zero_stage, (1, 2, 3), "engine.zero_stage")
    if cfg.cp.strategy == "disagg":
        raise ValueError("engine=deepspeed shards over every rank of the job, but cp=disagg keeps ranks that hold "
                         "no model (attention servers); use engine=ddp or engine=fsdp2 with cp=disagg")
    if ec.offload_params and ec.zero_stage != 3:
        raise ValueError(f"engine.offload_params=true needs engine.zero_stage=3 (got {ec.zero_stage}): only "
                         f"ZeRO-3 shards the parameters it would offload")
    if cfg.trainer.dtype == "float64":
        raise ValueError("engine=deepspeed keeps fp32 master weights and optimizer state whatever the model's "
                         "dtype, so trainer.dtype=float64 would not train in float64; set trainer.dtype=float32 "
                         "or use engine=ddp / engine=fsdp2 for float64")
    if ec.zero_stage == 3 and cfg.trainer.decode_eval != "none":
        raise ValueError("trainer.decode_eval decodes with the whole model on every rank, which engine.zero_stage=3 "
                         "never holds; set trainer.decode_eval=none or engine.zero_stage=1|2")


def validate(cfg: TrainConfig, world_size: int) -> int:
    """Cross-field checks; returns the data-parallel degree. Option names come from where the
    options are implemented (the strategy registry, layouts, kernels, datasets, ...)."""
    from lctrain.attention import strategy_names
    from lctrain.attention.layouts import LAYOUT_NAMES
    from lctrain.attention.local_kernels import KERNEL_NAMES
    from lctrain.attention.strategies import get_strategy
    from lctrain.build import DTYPE_NAMES
    from lctrain.data import DATASETS
    from lctrain.data.tokenizer import TOKENIZER_NAMES
    from lctrain.decode.combine import COMBINES
    from lctrain.engines import ENGINES
    from lctrain.engines.fsdp2 import PARAM_DTYPES
    from lctrain.models.rope import RopeScaling
    from lctrain.tracking import LOGGER_MODES, LOGGER_NAMES

    check_known_keys(cfg)
    _one_of(cfg.cp.strategy, strategy_names(), "cp.strategy")
    _one_of(cfg.cp.layout, LAYOUT_NAMES, "cp.layout")
    _one_of(cfg.cp.padding, PADDINGS, "cp.padding")
    _one_of(cfg.trainer.decode_eval, ("none", *COMBINES), "trainer.decode_eval")
    _one_of(cfg.kernel.name, KERNEL_NAMES, "kernel.name")
    _one_of(cfg.trainer.dtype, DTYPE_NAMES, "trainer.dtype")
    _one_of(cfg.trainer.device, DEVICES, "trainer.device")
    _one_of(cfg.data.name, tuple(DATASETS), "data.name")
    _one_of(cfg.data.tokenizer, TOKENIZER_NAMES, "data.tokenizer")
    _one_of(cfg.logger.name, LOGGER_NAMES, "logger")
    RopeScaling(**OmegaConf.to_container(OmegaConf.create(cfg.model.rope_scaling))).check()
    _one_of(cfg.engine.name, tuple(ENGINES), "engine.name")
    _one_of(cfg.engine.mixed_precision, tuple(PARAM_DTYPES), "engine.mixed_precision")
    if cfg.engine.name == "fsdp2" and cfg.cp.strategy == "disagg" and cfg.disagg.ping_pong:
        raise ValueError("cp=disagg with disagg.ping_pong=true interleaves the halves of each block inside the "
                         "model's forward, which engine=fsdp2's per-block weight gathering cannot follow; set "
                         "disagg.ping_pong=false or use engine=ddp")
    if cfg.engine.name == "deepspeed":
        _check_deepspeed(cfg)
    _one_of(cfg.logger.mode, LOGGER_MODES, "logger.mode")
    strategy = get_strategy(cfg.cp.strategy)
    if cfg.trainer.decode_eval != "none" and (cfg.data.name != "passkey" or not strategy.decodes):
        decoding = [name for name in strategy_names() if get_strategy(name).decodes]
        raise ValueError(
            f"trainer.decode_eval={cfg.trainer.decode_eval} decodes passkey answers with a prefill by cp="
            f"{'/'.join(decoding)}; with data={cfg.data.name}, cp={cfg.cp.strategy} set trainer.decode_eval=none"
        )
    if cfg.cp.size < 1:
        raise ValueError(f"cp.size must be >= 1, got {cfg.cp.size}")
    m = cfg.model
    if m.dim % m.num_heads or m.num_heads % m.num_kv_heads or (m.dim // m.num_heads) % 2:
        raise ValueError(
            f"model.dim ({m.dim}) / model.num_heads ({m.num_heads}) must be an even head_dim and "
            f"num_heads must divide by model.num_kv_heads ({m.num_kv_heads})"
        )
    if m.checkpoint_every < 1:
        raise ValueError(f"model.checkpoint_every must be >= 1 (1: every block), got {m.checkpoint_every}")
    if m.activation_offload and not m.activation_checkpointing:
        raise ValueError("model.activation_offload=true offloads the inputs activation checkpointing keeps; "
                         "set model.activation_checkpointing=true too")
    if m.mlp_tile_tokens < 0:
        raise ValueError(f"model.mlp_tile_tokens must be >= 0 (0: no tiling), got {m.mlp_tile_tokens}")
    if m.window < 0:
        raise ValueError(f"model.window must be >= 0 tokens (0: no sliding window), got {m.window}")
    dp = strategy.validate(cfg, world_size)
    if cfg.trainer.steps < 0:
        raise ValueError(f"trainer.steps must be >= 0 (0: evaluate only), got {cfg.trainer.steps}")
    for key in ("micro_batch_size", "grad_accum", "eval_samples", "keep_checkpoints"):
        if getattr(cfg.trainer, key) < 1:
            raise ValueError(f"trainer.{key} must be >= 1, got {getattr(cfg.trainer, key)}")
    if cfg.data.seq_len < 2:
        raise ValueError(f"data.seq_len must be >= 2, got {cfg.data.seq_len}")
    if cfg.data.name == "text" and not cfg.data.path:
        raise ValueError("data=text needs data.path=<file, directory or glob of .txt/.jsonl files>")
    if cfg.data.tokenizer == "hf" and not cfg.data.tokenizer_path:
        raise ValueError("data.tokenizer=hf needs data.tokenizer_path=<local tokenizer.json>")
    _check_reliability(cfg)
    if cfg.optim.lr <= 0 or not 0 <= cfg.optim.min_lr_ratio <= 1 or len(cfg.optim.betas) != 2:
        raise ValueError("optim: need lr > 0, 0 <= min_lr_ratio <= 1 and two betas, e.g. optim.betas=[0.9,0.95]")
    return dp


def check_known_keys(cfg) -> None:
    """Every key of the config is in the schema (``+trainer.stepz=5`` adds a key Hydra accepts)."""
    schema = OmegaConf.structured(TrainConfig)
    for group, node in cfg.items():
        if group not in schema:
            raise ValueError(f"unknown config group {group!r}; the groups are {list(schema)}")
        for key in node:
            if key not in schema[group]:
                close = [k for k in schema[group] if k.startswith(str(key)[:3])]
                raise ValueError(f"unknown config key {group}.{key}" + (f" (did you mean {group}.{close[0]}?)"
                                                                        if close else ""))


def _check_reliability(cfg) -> None:
    from lctrain.checkpoint.identity import SHAPE_FIELDS, identity_fields
    from lctrain.preemption import signal_numbers

    t = cfg.trainer
    if t.comm_timeout_s <= 0 or t.first_step_timeout_s <= 0 or t.max_wall_s < 0 or t.checkpoint_every < 0:
        raise ValueError("trainer: need comm_timeout_s > 0, first_step_timeout_s > 0, max_wall_s >= 0 (0: no "
                         "limit) and checkpoint_every >= 0 (0: none)")
    signal_numbers(t.stop_signals)
    changeable = sorted(set(identity_fields(cfg)) - set(SHAPE_FIELDS))
    for key in t.resume_allow_changes:
        if key not in changeable:
            raise ValueError(f"trainer.resume_allow_changes: {key!r} is not a field a resume checks; "
                             f"allowed: {changeable} (model shape fields can never change)")


PADDINGS = ("pad", "none")
DEVICES = ("auto", "cpu", "cuda")


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


def compose_object(overrides=()) -> TrainConfig:
    """``compose_config`` as a plain ``TrainConfig`` dataclass (fast to copy and to read)."""
    return OmegaConf.to_object(compose_config(overrides))
