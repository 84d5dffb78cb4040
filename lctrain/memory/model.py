"""Per-rank memory of one training step, from the config alone (no model is built).

``estimate(cfg, world)`` counts bytes by category, the way lctrain's code allocates them:

- **state**: parameters, gradients and AdamW's two moments as the engine holds them
  (ddp: whole, gradients in DDP's persistent buckets; fsdp2: 1/N shards plus the gathered
  blocks in flight; deepspeed: DeepSpeed's partitioning rule, ``zero_state_bytes``);
- **saved activations**: what autograd keeps per layer for the backward, counted tensor by
  tensor from the model's code (``layer_saved_bytes``): a checkpointed layer keeps only its
  input (on the host with ``model.activation_offload``), a tiled MLP none of its intermediates;
- **transient**: the working set on top of that at the moment it peaks: a layer's gradients
  in flight, a checkpointed layer's recomputation, one MLP tile, one loss chunk of logits, and
  the attention strategy's buffers in flight (K/V blocks travelling a ring, gathered K/V, ...).

The step is walked in order (forward, the loss, then every layer's backward from the top, while
its saved tensors are freed and its gradients appear) and the largest sum is the peak. The
suite and ``bench/memory.py`` compare it with the PyTorch profiler's measured peak of the real
step (``trainer.memory_profile=true``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

INT64 = 8


@dataclass
class Dtypes:
    """Bytes per element: weights as stored (``param``), activations (``act``: matmul outputs),
    the residual stream (``residual``) and the norms' / softmax statistics (``stat``)."""

    param: int
    act: int
    residual: int
    stat: int

    @classmethod
    def of(cls, cfg, device_type: str, engine: str | None = None) -> "Dtypes":
        """``engine``: the one holding the model (``engine_name``; default: the configured one)."""
        name = cfg.trainer.dtype
        engine = cfg.engine.name if engine is None else engine
        if name == "float64":
            return cls(8, 8, 8, 8)
        if cfg.engine.mixed_precision in ("bf16", "fp16") and engine in ("fsdp2", "deepspeed"):
            return cls(4, 2, 2, 4)  # the engine runs the model on 2-byte weights: everything in 2 bytes
        if name == "bfloat16" or (name == "auto" and device_type == "cuda"):
            return cls(4, 2, 4, 4)  # fp32 weights, bf16 autocast
        return cls(4, 4, 4, 4)


@dataclass
class Shape:
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def of(cls, model) -> "Shape":
        return cls(model.vocab_size, model.dim, model.num_layers, model.num_heads, model.num_kv_heads,
                   model.ffn_dim, model.tie_embeddings, model.qkv_bias)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        d, kv = self.dim, self.kv_dim
        bias = (d + 2 * kv) if self.qkv_bias else 0
        return 2 * d * d + 2 * d * kv + bias + 3 * d * self.ffn + 2 * d

    def embed_params(self) -> int:
        return self.vocab * self.dim

    def params(self) -> int:
        head = 0 if self.tied else self.vocab * self.dim
        return self.embed_params() + self.layers * self.layer_params() + self.dim + head


def norm_saved_bytes(shape: Shape, dt: Dtypes, consumers: int = 1) -> int:
    """Per token, one RMSNorm and the input its ``consumers`` projections keep: the norm's input in
    the compute dtype (a copy when that is wider), the reciprocal RMS, the normalised value, and the
    scaled output, shared by the projections; under autocast each projection keeps its own 2-byte
    cast of it instead. ``consumers=0``: checkpointed code (the loss chunks) keeps the output itself."""
    stat = max(dt.residual, dt.stat)
    own = stat * shape.dim + stat + dt.residual * shape.dim
    if dt.act < dt.residual and consumers:  # autocast: one cast per consuming projection
        return own + consumers * dt.act * shape.dim
    return own + dt.residual * shape.dim


def layer_saved_bytes(shape: Shape, dt: Dtypes, tiled_mlp: bool) -> int:
    """Per token, what one un-checkpointed block keeps for its backward: the attention's norm (read
    by q, k and v) and the MLP's (by gate and up); the rotated q and k and v, the attention output
    and its lse (kept by the attention), the output again as wo's input; the MLP's gate, silu, up
    and product (none with a tiled MLP: each tile recomputes them from its slice of the norm's
    output, which stays alive)."""
    d, kv, f, a = shape.dim, shape.kv_dim, shape.ffn, dt.act
    attention = 3 * a * d + 2 * a * kv + dt.stat * shape.heads
    mlp = 0 if tiled_mlp else 4 * a * f
    mlp_norm = norm_saved_bytes(shape, dt, 1 if tiled_mlp else 2)
    return norm_saved_bytes(shape, dt, 3) + mlp_norm + attention + mlp


def layer_forward_bytes(shape: Shape, dt: Dtypes, tokens: int, mlp_tokens: int, keeps_mlp: bool) -> int:
    """Working set while one block's forward runs, beyond what it saves: the residual stream's
    new value and the normalised input, and the MLP's gate, up and silu alive together unless
    they are being saved anyway (an un-tiled, un-checkpointed block)."""
    stream = 2 * dt.residual * shape.dim * tokens
    return stream + (0 if keeps_mlp else 3 * dt.act * shape.ffn * mlp_tokens)


def layer_backward_bytes(shape: Shape, dt: Dtypes, tokens: int, mlp_tokens: int, checkpointed: bool) -> int:
    """Working set of one block's backward beyond its saved tensors: the gradient of the residual
    stream and its copy at the branch, plus the MLP's gradients. Measured: about one and a half
    (tokens, ffn) gradients at once, since the saved intermediates are freed as their nodes finish.
    A recomputed block's stream gradient takes the place of its input, which the recomputation
    shares with the checkpoint instead of saving it again."""
    stream = (0 if checkpointed else 2) * dt.residual * shape.dim * tokens
    # a tile of a tiled MLP first recomputes its intermediates (measured: about two of the four
    # live while its backward runs)
    recompute = 2 * dt.act * shape.ffn * mlp_tokens if mlp_tokens < tokens else 0
    return stream + 3 * dt.act * shape.ffn * mlp_tokens // 2 + recompute


@dataclass
class MemoryEstimate:
    """Bytes one rank holds; ``peak`` is on the device, ``host`` what offload moved off it."""

    params: int
    grads: int
    optimizer: int
    activations: int  # saved for the backward at the end of the forward (device)
    host: int  # saved activations in host memory (model.activation_offload)
    transient: int  # on top of state + saved activations at the peak
    peak: int
    peak_phase: str
    tokens_per_rank: int
    notes: list = field(default_factory=list)

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [("params", self.params), ("grads", self.grads), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("transient", self.transient)]
        from lctrain.benchmarking import fmt_bytes

        text = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts)
        host = f"; host {fmt_bytes(self.host)}" if self.host else ""
        return (f"memory per rank (estimate): {text} -> peak {fmt_bytes(self.peak)} at {self.peak_phase}"
                f" ({self.tokens_per_rank:,} tokens per rank){host}")


def tokens_per_rank(cfg) -> int:
    """Tokens one rank's forward runs on: its layout shard of the (padded) sequence."""
    cp = max(1, cfg.cp.size)
    seq = cfg.data.seq_len
    if cfg.cp.strategy in ("none", "disagg") or cp == 1:
        local = seq
    else:
        multiple = 2 * cp if cfg.cp.layout == "zigzag" else cp
        local = -(-seq // multiple) * multiple // cp
    return local * cfg.trainer.micro_batch_size


def attention_bytes(cfg, shape: Shape, dt: Dtypes, tokens: int) -> tuple[int, int]:
    """(forward, backward) bytes one layer's attention has in flight beyond what it saves, counted
    from the strategies' code: fp32 partial outputs and gradient accumulators, the K/V blocks a ring
    double-buffers (and the fp32 dK/dV accumulators travelling back), gathered K/V, the head-sharded
    copies Ulysses works on; plus the local kernel's score tiles."""
    d, kv, h, a = shape.dim, shape.kv_dim, shape.heads, dt.act
    acc = 8 if dt.act == 8 else 4  # accumulation dtype
    cp, n = max(1, cfg.cp.size), tokens
    batch = cfg.trainer.micro_batch_size
    side = min(256, tokens // batch)
    # scores, probabilities and their gradient of one tile (the torch kernel; Triton keeps them on chip)
    tile = acc * batch * h * side * side * 3 if cfg.kernel.name == "torch" else 0
    strategy = cfg.cp.strategy if cp > 1 else "none"
    kv_block = a * 2 * kv * n  # this rank's K and V, stacked
    if strategy in ("ring", "usp"):
        forward = 2 * kv_block + 2 * acc * (d + h) * n
        backward = 2 * kv_block + 2 * acc * d * n + 3 * acc * 2 * kv * n + acc * h * n
    elif strategy == "allgather":  # every rank's K/V gathered, in forward and again in backward
        forward = cp * kv_block + acc * (d + h) * n
        backward = cp * kv_block + cp * acc * 2 * kv * n + acc * (d + h) * n
    elif strategy == "ulysses":  # the head-sharded q / k / v / out in flight, then fp32 gradients
        forward = a * (2 * d + 2 * kv) * n + acc * (d + h) * n
        backward = a * (2 * d + 2 * kv) * n + acc * (d + 2 * kv + h) * n
    elif strategy == "tree":  # the gathered queries of a chunk and their partial outputs
        chunk = (cfg.cp.query_chunk * batch or n * cp)
        forward = chunk * (a * d + 2 * acc * (d + h)) + acc * (d + h) * n
        backward = chunk * (a * d + 2 * acc * (d + h)) + acc * (d + 2 * kv + h) * n
    else:  # one rank's own kernel
        forward = acc * (d + h) * n
        backward = acc * (d + 2 * kv + h) * n
    return forward + tile, backward + tile


def state_bytes(cfg, shape: Shape, dt: Dtypes, world: int, engine: str) -> tuple[int, int, int, int]:
    """(params, grads, optimizer, in flight): bytes of model state one rank holds under ``engine``,
    and the largest gathered (unsharded) weights and gradients in flight at once when it shards."""
    total, p = shape.params(), dt.param
    tensors = 2 + 9 * shape.layers + (1 if not shape.tied else 0) + (3 * shape.layers if shape.qkv_bias else 0)
    n = world
    if engine == "fsdp2":
        ec = cfg.engine
        wire = {"bf16": 2, "fp16": 2}.get(ec.mixed_precision, p)
        share = -(-total // n)
        root = shape.embed_params() + shape.dim + (0 if shape.tied else shape.vocab * shape.dim)
        # the root (embeddings, final norm, an untied output weight) stays gathered, with its
        # unsharded gradients from the loss backward on; blocks are gathered two at a time
        # (prefetch), or all of them from their forward to their backward without resharding; one
        # block's unsharded gradients wait for their reduce-scatter, every block's when gradient
        # sync is off between accumulation steps
        blocks = shape.layers if not ec.reshard_after_forward else 2
        grad_blocks = shape.layers if cfg.trainer.grad_accum > 1 else 1
        flight = root * (wire + 4) + blocks * shape.layer_params() * wire + grad_blocks * shape.layer_params() * 4
        if ec.cpu_offload:  # the shards and AdamW state live in host memory
            return 0, 0, 0, flight
        return share * p, share * p, 2 * share * 4 + 4 * tensors, flight
    if engine == "deepspeed":
        from lctrain.engines.deepspeed import zero_state_bytes

        numels = _param_numels(shape)
        weight = 2 if cfg.engine.mixed_precision in ("bf16", "fp16") else p
        s = zero_state_bytes(numels, n, cfg.engine.zero_stage, weight)
        flight = 2 * shape.layer_params() * weight if cfg.engine.zero_stage == 3 else 0
        if cfg.engine.offload_optimizer:  # the fp32 partition, its gradients and AdamW live on the host
            s["params"] -= (s["optimizer"] - 4) // 2  # the master copy: 4 of AdamW's 8 bytes per element
            s["optimizer"], s["grads"] = 0, 0
        if cfg.engine.offload_params and cfg.engine.zero_stage == 3:
            s["params"] = 0  # only the gathered blocks in flight stay on the device
        return s["params"], s["grads"], s["optimizer"], flight
    # local / ddp: whole state; DDP's buckets hold the gradients from construction on
    return total * p, total * p, 2 * total * p + 4 * tensors, 0


def engine_name(cfg, world: int, distributed: bool = True) -> str:
    """The engine that holds the state, as ``build_engine`` picks it: one rank holds the bare model,
    except under DeepSpeed inside a process group (``distributed``: one started by torchrun)."""
    if world > 1 or (cfg.engine.name == "deepspeed" and distributed):
        return cfg.engine.name
    return "local"


def _param_numels(shape: Shape) -> list[int]:
    d, kv, f = shape.dim, shape.kv_dim, shape.ffn
    layer = [d, d * d, kv * d, kv * d, d * d, d, f * d, f * d, d * f]
    if shape.qkv_bias:
        layer += [d, kv, kv]
    head = [] if shape.tied else [shape.vocab * d]
    return [shape.vocab * d] + layer * shape.layers + [d] + head


def estimate(cfg, world: int, device_type: str = "cpu", distributed: bool = True) -> MemoryEstimate:
    """Per-rank bytes of one training step of ``cfg`` when ``world`` ranks hold the model, on
    ``device_type``; ``distributed=False``: a plain process without a process group."""
    engine = engine_name(cfg, world, distributed)
    shape, dt = Shape.of(cfg.model), Dtypes.of(cfg, device_type, engine)
    m = cfg.model
    n = tokens_per_rank(cfg)
    seq_local = n // cfg.trainer.micro_batch_size
    tile = m.mlp_tile_tokens
    tiled = bool(tile) and seq_local > tile
    mlp_tokens = min(n, tile * cfg.trainer.micro_batch_size) if tiled else n
    params, grads, optimizer, flight = state_bytes(cfg, shape, dt, world, engine)
    grads_grow = engine in ("local",)  # gradients appear during the backward (ddp: in its buckets already)
    static = params + optimizer + (0 if grads_grow else grads) + flight

    full_layer = layer_saved_bytes(shape, dt, tiled) * n
    checkpointed = [m.activation_checkpointing and i % max(1, m.checkpoint_every) == 0 for i in range(shape.layers)]
    ckpt_layer = dt.residual * shape.dim * n
    offload = m.activation_offload and device_type == "cuda"  # on CPU the "host" copy is the same memory
    on_device = [0 if (c and offload) else ckpt_layer if c else full_layer for c in checkpointed]
    host = sum(ckpt_layer for c in checkpointed if c and m.activation_offload)
    # once per step: embedding ids, RoPE tables, token coordinates; after the layers the final norm
    shared = INT64 * n + 2 * dt.residual * shape.head_dim * n + 2 * INT64 * n
    final_norm = norm_saved_bytes(shape, dt, 0) * n
    saved = sum(on_device) + shared + final_norm

    chunk = min(m.loss_chunk_tokens, n)
    logits = 4 * chunk * shape.vocab
    attn_fwd, attn_bwd = attention_bytes(cfg, shape, dt, n)
    layer_grads = shape.layer_params() * dt.param if grads_grow else 0
    head_grads = (shape.embed_params() + shape.dim) * dt.param if grads_grow else 0
    phases = {}
    held = shared
    for i in range(shape.layers):
        keeps = not (checkpointed[i] or tiled)
        work = max(layer_forward_bytes(shape, dt, n, mlp_tokens, keeps), attn_fwd)
        phases[f"forward of layer {i}"] = held + work
        held += on_device[i]
    phases["loss forward"] = saved + 2 * logits
    # (measured: the output weight's gradient arrives after the chunk's logits are gone)
    phases["loss backward"] = saved + 3 * logits
    # DDP all-reduces a bucket while the backward runs and the backend may stage a copy of it:
    # on 2 gloo ranks the measured peaks sit one bucket above the same step on one rank
    bucket = min(grads, int(cfg.engine.bucket_mb * 2**20)) if engine == "ddp" else 0
    phases["loss backward"] += bucket
    done = head_grads + bucket
    present = {"loss backward": bucket}  # gradients (and DDP's staged bucket) at each phase
    remaining = saved
    # the MLP half of a layer (its norm's and intermediates' saved tensors) is freed before the attention's backward
    mlp_half = (norm_saved_bytes(shape, dt, 2) + (0 if tiled else 4 * dt.act * shape.ffn)) * n
    for i in reversed(range(shape.layers)):
        # a recomputed block runs on its input (copied back from the host under offload)
        live = remaining + (full_layer + (ckpt_layer if offload else 0) if checkpointed[i] else 0) + done + layer_grads
        mlp = layer_backward_bytes(shape, dt, n, mlp_tokens, checkpointed[i])
        attention = 2 * dt.residual * shape.dim * n + attn_bwd - mlp_half
        phases[f"backward of layer {i}"] = live + max(mlp, attention)
        present[f"backward of layer {i}"] = done + layer_grads
        remaining -= on_device[i]
        done += layer_grads
    # clipping and AdamW's foreach step: every gradient present, plus temporaries (measured: about a
    # fifth of the weights' bytes)
    phases["optimizer step"] = (grads if grads_grow else 0) + params // 5
    present["optimizer step"] = grads if grads_grow else 0
    phase = max(phases, key=phases.get)
    peak = static + phases[phase]
    live_saved = saved if phase != "optimizer step" and not phase.startswith("forward") else 0
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer, activations=saved, host=host,
                          transient=max(0, phases[phase] - live_saved - present.get(phase, 0)), peak=peak,
                          peak_phase=phase, tokens_per_rank=n)


# What each knob changes, in the order a user would reach for them (``fitting_knobs``).
def _knobs(cfg, world: int, device_type: str) -> list[tuple[str, dict]]:
    m, seq = cfg.model, tokens_per_rank(cfg) // cfg.trainer.micro_batch_size
    knobs = []
    if not m.activation_checkpointing:
        knobs.append(("model.activation_checkpointing=true", {"model.activation_checkpointing": True}))
    elif m.checkpoint_every > 1:
        knobs.append(("model.checkpoint_every=1", {"model.checkpoint_every": 1}))
    if not m.mlp_tile_tokens and seq > 4096:
        knobs.append(("model.mlp_tile_tokens=4096", {"model.mlp_tile_tokens": 4096}))
    if device_type == "cuda" and not m.activation_offload:
        knobs.append(("model.activation_checkpointing=true model.activation_offload=true",
                      {"model.activation_checkpointing": True, "model.activation_offload": True}))
    if m.loss_chunk_tokens > 1024:
        knobs.append(("model.loss_chunk_tokens=1024", {"model.loss_chunk_tokens": 1024}))
    if world > 1 and cfg.engine.name == "ddp":
        knobs.append(("engine=fsdp2", {"engine.name": "fsdp2"}))
    if cfg.trainer.micro_batch_size > 1:
        knobs.append(("trainer.micro_batch_size=1 (and trainer.grad_accum up)", {"trainer.micro_batch_size": 1}))
    return knobs


def fitting_knobs(cfg, world: int, device_type: str, capacity: int, distributed: bool = True) -> list[str]:
    """Overrides that each bring the estimate under ``capacity``; if none alone does, all of them
    together (when that fits)."""
    from omegaconf import OmegaConf

    fits, combined = [], OmegaConf.create(OmegaConf.to_container(cfg))
    for text, changes in _knobs(cfg, world, device_type):
        trial = OmegaConf.create(OmegaConf.to_container(cfg))
        for key, value in changes.items():
            OmegaConf.update(trial, key, value)
            OmegaConf.update(combined, key, value)
        if estimate(trial, world, device_type, distributed).peak <= capacity:
            fits.append(text)
    if not fits and estimate(combined, world, device_type, distributed).peak <= capacity:
        fits.append(" ".join(text for text, _ in _knobs(cfg, world, device_type)))
    return fits
