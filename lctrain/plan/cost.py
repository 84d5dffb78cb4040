"""Predicted time of one training step for one layout of the cluster (a ``Candidate``).

Per GPU and per step (one sequence per data-parallel replica, micro batch 1):

- **matmuls**: 2 FLOPs per weight per token forward, twice that backward, plus the recomputed
  forwards (checkpointed blocks; the tiled MLP's tiles once more), at
  ``peak_tflops x matmul_efficiency``;
- **attention**: the local kernel's work tile by tile (``lctrain.plan.tiles``): every tile a
  call visits costs 4 h d FLOPs per (query, key) pair of a full tile forward and 2.5x that
  backward (the five matmuls of a flash backward against two), a partly masked tile
  ``partial_tile_cost`` full ones, plus fixed costs per tile and per call; the busiest rank's
  tiles for the layout and the strategy (a ring waits for the slowest rank at every step), at
  ``peak_tflops x attention_efficiency``. Ranks sharing cores (``cores_per_node``) are also
  bounded by their node's total compute over its cores;
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

import numpy as np

from lctrain.attention.balance import (ModelShape, one_document, ring_bytes, skip_reason, strategy_work,
                                       traffic_per_rank, ulysses_bytes, work_matrix)
from lctrain.attention.layouts import get_layout
from lctrain.attention.strategies.ulysses import kv_replicas
from lctrain_kernels.mask import PAD_DOC, Mask
from lctrain.memory.model import Dtypes, Shape, estimate
from lctrain.plan.cluster import ClusterConfig
from lctrain.plan.tiles import tile_count_matrices


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


EXACT_TOKENS = 65536  # work is counted exactly at up to this many tokens, then scaled


def _exact_length(layout: str, cp: int, seq_len: int, window: int) -> tuple[int, int]:
    """(padded length, the length counted exactly): the trainer pads to the layout's multiple;
    full causal attention is counted at up to ``EXACT_TOKENS`` and scaled (a planner needs the
    balance, not the last pair); a window is counted at the full length (its pairs grow linearly)."""
    multiple = 2 * cp if layout == "zigzag" else cp
    padded = -(-seq_len // multiple) * multiple
    return padded, padded if window else min(padded, max(multiple, EXACT_TOKENS // multiple * multiple))


def _document(length: int, real: int) -> np.ndarray:
    doc = one_document(length)
    doc[real:] = PAD_DOC  # the padding the trainer adds sees nothing and is seen by nothing
    return doc


@lru_cache(maxsize=64)
def _work(layout: str, cp: int, seq_len: int, window: int = 0):
    """W[r, j]: visible pairs of one document of ``seq_len`` tokens over ``cp`` ranks, causal (and
    windowed); every entry grows as s^2 up to O(s) terms, so a long sequence is scaled."""
    padded, small = _exact_length(layout, cp, seq_len, window)
    w = work_matrix(get_layout(layout, cp), _document(small, min(seq_len, small)),
                    Mask(causal=True, window=window or None))
    return w if small == padded else w * ((padded / small) ** 2)


MAX_TILES_PER_SIDE = 64  # a shard's tiles are counted on at most this grid, then scaled


@lru_cache(maxsize=64)
def _tile_work(layout: str, cp: int, seq_len: int, window: int, block: int, partial_cost: float):
    """(T[r, j] pair-equivalent tile work, tiles visited) of the same document with the kernel's
    ``block`` x ``block`` tiles. Tiles are counted on a grid of at most ``MAX_TILES_PER_SIDE``
    per shard (the exact length, the tile shrunk in proportion) and scaled to the real grid:
    partly masked tiles lie along the mask's boundaries (lines: they grow with the side), full
    ones fill an area (they grow with its square)."""
    padded, small = _exact_length(layout, cp, seq_len, window)
    side = padded / cp / block  # real tiles per shard side
    grid = min(side, MAX_TILES_PER_SIDE)
    tile = max(1, round(small / cp / grid))
    doc = _document(small, min(seq_len, small))
    mask = Mask(causal=True, window=window or None)
    full, partial = tile_count_matrices(get_layout(layout, cp), doc, mask, tile, tile)
    visited = full + partial
    scale = side / (small / cp / tile)
    # refined by `scale`, a full tile gives scale^2 full ones; a partial one (the boundary crosses
    # it, about half visible) gives `scale` partial ones along the boundary and half the rest full
    full = (visited - partial) * scale**2 + partial * (scale**2 - scale) / 2
    partial = partial * scale
    return (full + partial_cost * partial) * block**2, full + partial


@dataclass(frozen=True)
class AttentionWork:
    """One attention layer's local-kernel work on one sequence, in pair-equivalents of tile work."""

    busiest: float  # the busiest rank's
    mean: float  # the mean over ranks (what ranks sharing cores add up to)
    lockstep: float  # ring: the sum over steps of the slowest rank's; otherwise the busiest's
    tiles: float  # tiles the busiest rank visits (each costs the per-tile overhead)
    calls: int  # kernel calls per pass per rank (a ring makes one per step)


def attention_work(c: Candidate, cl: ClusterConfig, seq_len: int, window: int = 0) -> AttentionWork:
    strategy = c.strategy if c.cp > 1 else "none"
    w, counts = _tile_work(c.layout, c.cp, seq_len, window, cl.attention_block, cl.partial_tile_cost)
    if c.cp == 1:
        return AttentionWork(float(w.sum()), float(w.sum()), float(w.sum()), float(counts.sum()), 1)
    work = strategy_work(strategy, w.round().astype("int64"), c.ulysses)
    tiles = strategy_work(strategy, counts.round().astype("int64"), c.ulysses)
    # Ulysses' ranks each walk the whole (usp: the group's) tile grid with a share of the heads
    walkers = {"ulysses": c.cp, "usp": c.ulysses}.get(strategy, 1)
    lockstep = sum(work.ring_step_max) if work.ring_step_max is not None else max(work.per_rank)
    if strategy == "ring" and cl.alone_speedup != 1.0 and not cl.shares_cores:
        # the slowest rank's work beyond the runner-up's runs while the others wait
        steps = [sorted(w[r, (r - i) % c.cp] for r in range(c.cp))[-2:] for i in range(c.cp)]
        lockstep = sum(second + (top - second) / cl.alone_speedup for second, top in steps)
    calls = {"ring": c.cp, "usp": c.cp // c.ulysses}.get(strategy, 1)
    return AttentionWork(max(work.per_rank), work.mean, lockstep, max(tiles.per_rank) * walkers, calls)


def _comm_shape(shape: Shape) -> ModelShape:
    return ModelShape(batch=1, heads=shape.heads, h_kv=shape.kv_heads, head_dim=shape.head_dim, dtype="bf16")


def attention_seconds(c: Candidate, cl: ClusterConfig, shape: Shape, seq_len: int,
                      window: int = 0) -> tuple[float, float, float]:
    """(compute of the busiest rank, exposed communication, mean compute over ranks) of one layer's
    attention for one sequence, forward + backward (+ the recomputed forward under
    checkpointing), for candidate ``c``. Compute is tile work at the attention rate plus the
    kernel's per-tile and per-call overheads."""
    strategy = c.strategy if c.cp > 1 else "none"
    work = attention_work(c, cl, seq_len, window)
    rate = cl.peak_tflops * 1e12 * cl.attention_efficiency
    per_pair = 4 * shape.heads * shape.head_dim
    passes = 1 + 2.5 + (1 if c.checkpointing else 0)
    visits = 2 + (1 if c.checkpointing else 0)  # tile and call visits: forward, backward, recomputed forward
    overhead = visits * (work.tiles * cl.tile_overhead_us + work.calls * cl.attention_call_us) * 1e-6
    mean = work.mean * per_pair * passes / rate + overhead
    if strategy == "none":
        return work.busiest * per_pair * passes / rate + overhead, 0.0, mean
    ms = _comm_shape(shape)
    local = seq_len // c.cp
    bw, lat = cl.link(c.cp)
    if strategy in ("ring", "usp"):
        steps = work.calls
        # one ring step of the slowest rank, forward: its tiles at the rate plus its overheads
        step_flops = work.lockstep / steps * per_pair / rate
        step_overhead = (work.tiles / steps * cl.tile_overhead_us + cl.attention_call_us) * 1e-6
        exchange = 0.0
        if strategy == "ring":
            traffic = traffic_per_rank("ring", c.cp, seq_len, ms)
            hop_fwd = lat + traffic.forward / (c.cp - 1) / bw
            hop_bwd = hop_fwd + lat + (traffic.backward - traffic.forward) / c.cp / bw  # K/V again, dK/dV
        else:
            u = c.ulysses
            ex_fwd, ex_bwd = ulysses_bytes(u, local, ms, ms.elem_bytes)
            bw_u, lat_u = cl.link(u)  # the Ulysses groups: consecutive ranks, inside a node when u fits
            refwd = 1 if c.checkpointing else 0
            exchange = (ex_fwd * (1 + refwd) + ex_bwd) / bw_u + (4 * (1 + refwd) + 2) * lat_u
            kv_heads = ms.h_kv * kv_replicas(ms.h_kv, u) // u
            ring_fwd, ring_bwd = ring_bytes(steps, u * local, kv_heads, ms)
            hop_fwd = lat + ring_fwd / (steps - 1) / bw
            hop_bwd = hop_fwd + lat + (ring_bwd - ring_fwd) / steps / bw
        step_fwd, step_bwd = step_flops + step_overhead, 2.5 * step_flops + step_overhead
        fwd = (steps - 1) * max(step_fwd, hop_fwd) + step_fwd
        bwd = (steps - 1) * max(step_bwd, hop_bwd) + step_bwd + hop_bwd  # + the last hop home
        compute = work.lockstep * per_pair * passes / rate + overhead
        total = fwd * (2 if c.checkpointing else 1) + bwd
        return compute, max(0.0, total - compute) + exchange, mean
    traffic = traffic_per_rank(strategy, c.cp, seq_len, ms)
    refwd = 1 if c.checkpointing else 0
    exposed = (traffic.forward * (1 + refwd) + traffic.backward) / bw \
        + (traffic.messages_forward * (1 + refwd) + traffic.messages_backward) * lat
    return work.busiest * per_pair * passes / rate + overhead, exposed, mean


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
    attn_compute, attn_comm, attn_mean = (batch * x for x in attention_seconds(c, cl, shape, seq, cfg.model.window))
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
    if cl.shares_cores:
        # Ranks share cores: a waiting rank gives its core away, so the step is at least the
        # whole node's compute spread over its cores (the critical path above runs at one core
        # per rank).
        node_compute = cl.gpus_per_node * (shape.layers * (layer_compute + attn_mean) + head_flops / mm_rate
                                           + optimizer_s)
        step = max(step, node_compute / cl.cores_per_node)
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
