"""Predicted time of one training step for one layout of the cluster (a ``Candidate``).

Per GPU and per step (one sequence per data-parallel replica, micro batch 1):

- **matmuls**: 2 FLOPs per weight per token forward, twice that backward, plus the recomputed
  forwards (checkpointed blocks; the tiled MLP's tiles once more), at
  ``peak_tflops x matmul_efficiency``;
- **attention**: 4 h d FLOPs per visible (query, key) pair forward and 2.5x that backward (the
  five matmuls of a flash backward against two), counted exactly by ``lctrain.attention.balance``
  for the layout and the strategy (the busiest rank; a ring waits for the slowest rank at every
  step), at ``peak_tflops x attention_efficiency``;
- **context-parallel traffic**: the strategy's bytes and messages per layer from
  ``balance.traffic_per_rank`` on the slowest link of the cp group (NVLink inside a node,
  InfiniBand across). A ring hides a hop behind the step's compute: each step costs
  max(compute, hop). Ulysses, all-gather and tree collectives sit on the critical path. usp runs
  its Ulysses exchanges inside groups of ``ulysses_size`` ranks and its ring across them;
- **engine traffic**: FSDP2 / ZeRO-3 all-gather each block's bf16 weights before its forward and
  again before its backward and reduce-scatter its gradients (fp32 under FSDP2's policy, bf16 under
  DeepSpeed's), over every rank; DDP all-reduces the fp32 gradients. Prefetching hides them behind
  a block's compute: a block costs max(compute, traffic);
- **activation offload**: each checkpointed input goes to the host and back over PCIe, on the
  compute stream (lctrain's implementation), so it adds its time;
- **optimizer**: AdamW reads and writes about 24 B per local parameter at HBM bandwidth.

Memory per GPU comes from ``lctrain.memory.estimate``; a row is infeasible when it exceeds
``memory_gib x usable_memory`` or when a strategy rule refuses the degree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from lctrain.attention.balance import (ModelShape, _ring_bytes, _ulysses_bytes, one_document, skip_reason,
                                       strategy_work, traffic_per_rank, work_matrix)
from lctrain.attention.layouts import get_layout
from lctrain.attention.strategies.ulysses import kv_replicas
from lctrain_kernels.mask import PAD_DOC, Mask
from lctrain.memory.model import Dtypes, Shape, estimate
from lctrain.plan.cluster import ClusterConfig


@dataclass(frozen=True)
class Candidate:
    strategy: str  # none | ring | allgather | ulysses | usp | tree
    layout: str
    cp: int
    ulysses: int  # usp's Ulysses degree (1 otherwise)
    engine: str  # fsdp2 | deepspeed | ddp
    checkpointing: bool
    mlp_tile: int
    offload: bool

    def overrides(self) -> list[str]:
        """The training overrides that run this row."""
        out = []
        if self.strategy != "none":
            out += [f"cp={self.strategy}", f"cp.size={self.cp}", f"cp.layout={self.layout}"]
            if self.strategy == "usp":
                out.append(f"cp.ulysses_size={self.ulysses}")
        out += {"fsdp2": ["engine=fsdp2", "engine.mixed_precision=bf16"],
                "deepspeed": ["engine=deepspeed", "engine.zero_stage=3", "engine.mixed_precision=bf16"],
                "ddp": ["engine=ddp"]}[self.engine]
        out.append(f"model.activation_checkpointing={str(self.checkpointing).lower()}")
        if self.mlp_tile:
            out.append(f"model.mlp_tile_tokens={self.mlp_tile}")
        if self.offload:
            out.append("model.activation_offload=true")
        out.append("kernel=auto")
        return out

    def label(self) -> str:
        if self.strategy == "none":
            return "none"
        deg = f"{self.ulysses}x{self.cp // self.ulysses}" if self.strategy == "usp" else str(self.cp)
        return f"{self.strategy}/{self.layout} {deg}"


@dataclass
class Prediction:
    candidate: Candidate
    step_s: float = float("inf")
    tokens_per_gpu_s: float = 0.0
    mfu: float = 0.0
    memory_bytes: int = 0
    infeasible: str | None = None
    parts: dict = field(default_factory=dict)  # seconds per step by kind

    def as_dict(self) -> dict:
        c = self.candidate
        return {"strategy": c.strategy, "layout": c.layout, "cp": c.cp, "ulysses": c.ulysses, "engine": c.engine,
                "checkpointing": c.checkpointing, "mlp_tile_tokens": c.mlp_tile, "offload": c.offload,
                "step_s": self.step_s, "tokens_per_gpu_s": self.tokens_per_gpu_s, "mfu": self.mfu,
                "memory_bytes": self.memory_bytes, "infeasible": self.infeasible, "parts": self.parts,
                "overrides": c.overrides()}


EXACT_TOKENS = 65536  # the work matrix is counted exactly at up to this many tokens, then scaled


@lru_cache(maxsize=64)
def _work(layout: str, cp: int, seq_len: int, window: int = 0):
    """W[r, j] of one document of ``seq_len`` tokens (padded to the layout's multiple, as the
    trainer pads) over ``cp`` ranks, causal (and windowed). Full causal attention is counted
    exactly at up to ``EXACT_TOKENS`` tokens and scaled by the squared length ratio: every entry
    grows as s^2 up to O(s) terms (a planner needs the balance, not the last pair); a window is
    counted at the full length, since its pairs grow linearly."""
    multiple = 2 * cp if layout == "zigzag" else cp
    padded = -(-seq_len // multiple) * multiple
    small = padded if window else min(padded, max(multiple, EXACT_TOKENS // multiple * multiple))
    w = _exact_work(layout, cp, small, min(seq_len, small), window)
    return w if small == padded else w * ((padded / small) ** 2)


@lru_cache(maxsize=64)
def _exact_work(layout: str, cp: int, length: int, real: int, window: int):
    doc = one_document(length)
    doc[real:] = PAD_DOC  # the padding the trainer adds sees nothing and is seen by nothing
    return work_matrix(get_layout(layout, cp), doc, Mask(causal=True, window=window or None))


def _pairs(layout: str, cp: int, seq_len: int, strategy: str, ulysses: int, window: int = 0) -> tuple[float, float]:
    """(pairs of the busiest rank, lockstep pairs: the sum over ring steps of the slowest rank's)
    of one attention layer, one document of ``seq_len`` tokens."""
    w = _work(layout, cp, seq_len, window).astype("int64")
    if cp == 1:
        return float(w.sum()), float(w.sum())
    work = strategy_work(strategy, w, ulysses)
    lockstep = sum(work.ring_step_max) if work.ring_step_max is not None else max(work.per_rank)
    return max(work.per_rank), lockstep


def _comm_shape(shape: Shape) -> ModelShape:
    return ModelShape(batch=1, heads=shape.heads, h_kv=shape.kv_heads, head_dim=shape.head_dim, dtype="bf16")


def attention_seconds(c: Candidate, cl: ClusterConfig, shape: Shape, seq_len: int,
                      window: int = 0) -> tuple[float, float, float]:
    """(compute, exposed communication, pairs of the busiest rank) of one layer's attention for one
    sequence, forward + backward (+ the recomputed forward under checkpointing), for candidate ``c``."""
    strategy = c.strategy if c.cp > 1 else "none"
    busiest, lockstep = _pairs(c.layout, c.cp, seq_len, "ring" if strategy == "none" else strategy, c.ulysses,
                               window)
    rate = cl.peak_tflops * 1e12 * cl.attention_efficiency
    per_pair = 4 * shape.heads * shape.head_dim
    passes = 1 + 2.5 + (1 if c.checkpointing else 0)
    if strategy == "none":
        return busiest * per_pair * passes / rate, 0.0, busiest
    ms = _comm_shape(shape)
    local = seq_len // c.cp
    bw, lat = cl.link(c.cp)
    if strategy == "ring":
        traffic = traffic_per_rank("ring", c.cp, seq_len, ms)
        hop_fwd = lat + traffic.forward / (c.cp - 1) / bw
        hop_bwd = lat + (traffic.backward - traffic.forward) / c.cp / bw  # dK/dV accumulators; K/V again
        hop_bwd += hop_fwd
        step_compute = lockstep / c.cp * per_pair / rate  # one ring step of the slowest rank
        fwd = (c.cp - 1) * max(step_compute, hop_fwd) + step_compute
        bwd = (c.cp - 1) * max(2.5 * step_compute, hop_bwd) + 2.5 * step_compute + hop_bwd  # + the last hop home
        compute = lockstep * per_pair * passes / rate
        total = fwd * (2 if c.checkpointing else 1) + bwd
        return compute, max(0.0, total - compute), busiest
    if strategy == "usp":
        u, groups = c.ulysses, c.cp // c.ulysses
        ex_fwd, ex_bwd = _ulysses_bytes(u, local, ms, ms.elem_bytes)
        bw_u, lat_u = cl.link(u)  # the Ulysses groups: consecutive ranks, inside a node when u fits
        refwd = 1 if c.checkpointing else 0
        exchange = (ex_fwd * (1 + refwd) + ex_bwd) / bw_u + (4 * (1 + refwd) + 2) * lat_u
        kv_heads = ms.h_kv * kv_replicas(ms.h_kv, u) // u
        ring_fwd, ring_bwd = _ring_bytes(groups, u * local, kv_heads, ms)
        hop = lat + ring_fwd / (groups - 1) / bw
        hop_bwd = hop + lat + (ring_bwd - ring_fwd) / groups / bw  # K/V again and the fp32 dK/dV
        step_compute = lockstep / groups * per_pair / rate
        fwd = (groups - 1) * max(step_compute, hop) + step_compute
        bwd = (groups - 1) * max(2.5 * step_compute, hop_bwd) + 2.5 * step_compute + hop_bwd
        compute = lockstep * per_pair * passes / rate
        return compute, max(0.0, fwd * (1 + refwd) + bwd - compute) + exchange, busiest
    traffic = traffic_per_rank(strategy, c.cp, seq_len, ms)
    refwd = 1 if c.checkpointing else 0
    exposed = (traffic.forward * (1 + refwd) + traffic.backward) / bw \
        + (traffic.messages_forward * (1 + refwd) + traffic.messages_backward) * lat
    return busiest * per_pair * passes / rate, exposed, busiest


def predict(c: Candidate, cfg, cl: ClusterConfig, check_memory: bool = True) -> Prediction:
    """Step time, tokens/s per GPU, MFU and memory of candidate ``c`` for the model and sequence of
    ``cfg`` (a TrainConfig object) on cluster ``cl``; ``check_memory=False`` times a row that would
    not fit (for comparisons with published runs whose memory set-up differs)."""
    world = cl.world
    pred = Prediction(c)
    shape = Shape.of(cfg.model)
    seq = cfg.data.seq_len
    if world % c.cp:
        pred.infeasible = f"cp.size={c.cp} does not divide the {world} GPUs"
        return pred
    if c.strategy in ("ulysses", "usp"):
        why = skip_reason(c.strategy, c.cp, _comm_shape(shape), c.ulysses)
        if why:
            pred.infeasible = why
            return pred
    if c.offload and not c.checkpointing:
        pred.infeasible = "activation offload needs checkpointing"
        return pred
    run = _config_for(cfg, c)
    mem = estimate(run, world, "cuda")
    pred.memory_bytes = mem.peak
    if check_memory and mem.peak > cl.capacity_bytes:
        pred.infeasible = (f"needs {mem.peak / 2**30:.0f} GiB per GPU (peak at {mem.peak_phase}), "
                           f"{cl.capacity_bytes / 2**30:.0f} GiB usable")
        return pred
    batch = cfg.trainer.micro_batch_size
    tokens = mem.tokens_per_rank  # per GPU and micro batch: its layout shard of every sequence
    mm_rate = cl.peak_tflops * 1e12 * cl.matmul_efficiency
    layer_flops = 2 * (shape.layer_params() - 2 * shape.dim) * tokens
    mlp_flops = 2 * 3 * shape.dim * shape.ffn * tokens
    # recomputed: checkpointed blocks' forwards (every k-th block), and each MLP tile once more
    every = max(1, cfg.model.checkpoint_every)
    ckpt_share = (-(-shape.layers // every) / shape.layers) if c.checkpointing else 0.0
    tiled = c.mlp_tile and tokens // batch > c.mlp_tile
    recompute = layer_flops * ckpt_share + (mlp_flops if tiled else 0)
    layer_compute = (3 * layer_flops + recompute) / mm_rate
    attn_compute, attn_comm, busiest = (batch * x for x in attention_seconds(c, cl, shape, seq, cfg.model.window))
    # engine traffic per block, hidden behind the block's compute by prefetching
    bw, lat = cl.link(world)
    p_layer = shape.layer_params()
    share = (world - 1) / world
    if world == 1:
        engine_bytes = 0.0
    elif c.engine == "fsdp2":
        engine_bytes = share * p_layer * (2 + 2 + 4)
    elif c.engine == "deepspeed":
        engine_bytes = share * p_layer * (2 + 2 + 2)
    else:
        engine_bytes = 2 * share * p_layer * 4
    engine_s = engine_bytes / bw + (3 * lat if world > 1 else 0)
    block_compute = layer_compute + attn_compute + attn_comm
    residual = Dtypes.of(run, "cuda", c.engine).residual
    offload_s = 2 * shape.dim * residual * tokens / (cl.pcie_gbps * 1e9) if c.offload else 0.0
    block = max(block_compute, engine_s) + offload_s
    head_flops = 2 * shape.vocab * shape.dim * tokens * 4  # forward, recomputed per chunk, backward
    optimizer_s = 24 * shape.params() / (world if c.engine != "ddp" else 1) / (cl.hbm_gbps * 1e9)
    step = shape.layers * block + head_flops / mm_rate + optimizer_s
    pred.step_s = step
    pred.tokens_per_gpu_s = tokens / step
    pairs = float(_work(c.layout, c.cp, seq, cfg.model.window).sum())  # every visible pair of a sequence
    model_flops = batch * (6 * (shape.layers * (shape.layer_params() - 2 * shape.dim) + shape.vocab * shape.dim) * seq
                           + 3 * 4 * shape.heads * shape.head_dim * pairs * shape.layers)  # forward + backward
    pred.mfu = model_flops * (world // c.cp) / (step * world * cl.peak_tflops * 1e12)
    pred.parts = {"matmul": shape.layers * layer_compute + head_flops / mm_rate,
                  "attention": shape.layers * attn_compute, "cp_comm": shape.layers * attn_comm,
                  "engine_exposed": shape.layers * max(0.0, engine_s - block_compute),
                  "offload": shape.layers * offload_s, "optimizer": optimizer_s}
    return pred


def _config_for(cfg, c: Candidate):
    """``cfg`` (a TrainConfig object) set up as candidate ``c``, for the memory model: new cp,
    engine, model and kernel sections, everything else shared."""
    from dataclasses import replace

    return replace(
        cfg,
        cp=replace(cfg.cp, strategy=c.strategy, size=c.cp, layout=c.layout, ulysses_size=c.ulysses),
        engine=replace(cfg.engine, name=c.engine, zero_stage=3,
                       mixed_precision="bf16" if c.engine in ("fsdp2", "deepspeed") else "none"),
        model=replace(cfg.model, activation_checkpointing=c.checkpointing, mlp_tile_tokens=c.mlp_tile,
                      activation_offload=c.offload),
        kernel=replace(cfg.kernel, name="auto"))
