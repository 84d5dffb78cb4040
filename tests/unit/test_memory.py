"""The memory model against what PyTorch really keeps: saved tensors counted by autograd's hooks,
peaks measured by the profiler's allocation events, and the start-up fit check's verdicts."""

from __future__ import annotations

import pytest
import torch

from lctrain.attention import build_attention
from lctrain.build import build_model
from lctrain.config import compose_config
from lctrain.memory import check_fits, estimate, fitting_knobs
from lctrain.memory.measure import MemorySpan
from lctrain.memory.model import Dtypes, Shape, layer_saved_bytes, norm_saved_bytes
from lctrain.models.loss import chunked_cross_entropy


def test_memory_span_sees_allocations_and_frees():
    with MemorySpan() as span:
        with span.phase("first"):
            a = torch.empty(1 << 20, dtype=torch.uint8)
            b = torch.empty(2 << 20, dtype=torch.uint8)
            del a
        with span.phase("second"):
            c = torch.empty(1 << 19, dtype=torch.uint8)
            del b, c
    assert span.peak_bytes == 3 << 20
    assert span.peak_in("first") == 3 << 20
    assert span.peak_in("second") == (2 << 20) + (1 << 19)
    assert span.end_bytes == 0


def _block_saved_bytes(cfg, autocast: bool, dtype=torch.float32) -> int:
    """Bytes of the distinct storages one block saves for its backward, weights and the tensors
    every block shares (RoPE tables, coordinates) left out."""
    model = build_model(cfg.model, build_attention("none")).to(dtype)
    seq = cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (1, seq))
    pos = torch.arange(seq)[None]
    doc = torch.zeros(1, seq, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x = model.embed(ids).detach().requires_grad_()
        cos, sin = model.rope(pos, x.dtype)
        skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin, pos, doc)}
        seen = {}

        def pack(t):  # per-token tensors only: autocast's bf16 weight copies are not activations
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip and seq in t.shape:
                seen.setdefault(ptr, t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.layers[0](x, cos, sin, pos, doc)
    return sum(seen.values())


@pytest.mark.parametrize("dtype,tile", [("float32", 0), ("float64", 0), ("bfloat16", 0), ("float32", 64)])
def test_layer_saved_bytes_is_what_autograd_saves(dtype, tile):
    cfg = compose_config(["data.seq_len=256", f"trainer.dtype={dtype}", f"model.mlp_tile_tokens={tile}"])
    autocast = dtype == "bfloat16"
    measured = _block_saved_bytes(cfg, autocast, torch.float64 if dtype == "float64" else torch.float32)
    dt = Dtypes.of(cfg, "cpu")
    # a checkpointed tile keeps its input (a slice of the norm's output) outside autograd's hooks
    hidden = dt.residual * cfg.model.dim * 256 if tile else 0
    assert measured + hidden == layer_saved_bytes(Shape.of(cfg.model), dt, bool(tile)) * 256


def _measured_step(cfg) -> int:
    """Peak tensor bytes of one forward + chunked loss + backward of a fresh model (weights included)."""
    with MemorySpan() as span:
        model = build_model(cfg.model, build_attention("none"), context_len=cfg.data.seq_len)
        seq = cfg.data.seq_len
        ids = torch.randint(0, cfg.model.vocab_size, (1, seq))
        pos = torch.arange(seq)[None]
        hidden = model(ids, pos, torch.zeros(1, seq, dtype=torch.long))
        loss = chunked_cross_entropy(hidden, model.output_weight, ids, cfg.model.loss_chunk_tokens)
        loss.backward()
    return span.peak_bytes


@pytest.mark.parametrize("knobs", [[], ["model.activation_checkpointing=true"], ["model.mlp_tile_tokens=256"],
                                   ["model.activation_checkpointing=true", "model.mlp_tile_tokens=256",
                                    "model.checkpoint_every=2"]])
def test_estimate_within_ten_percent_of_a_measured_step(knobs):
    cfg = compose_config(["data.seq_len=2048", "model.loss_chunk_tokens=512", *knobs])
    est = estimate(cfg, 1)
    # no optimizer state in this step: the estimate's peak without it
    predicted = est.peak - est.optimizer
    measured = _measured_step(cfg)
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured, est.peak_phase)


def test_knobs_shrink_the_estimate_where_they_should():
    base = ["model=llama_1b", "data.seq_len=131072", "kernel=triton", "cp=striped", "cp.size=8",
            "engine=fsdp2", "engine.mixed_precision=bf16", "model.activation_checkpointing=false",
            "model.loss_chunk_tokens=1024"]
    plain = estimate(compose_config(base), 8, "cuda")
    ckpt = estimate(compose_config(base + ["model.activation_checkpointing=true"]), 8, "cuda")
    tiled = estimate(compose_config(base + ["model.activation_checkpointing=true", "model.mlp_tile_tokens=4096"]),
                     8, "cuda")
    offload = estimate(compose_config(base + ["model.activation_checkpointing=true", "model.mlp_tile_tokens=4096",
                                              "model.activation_offload=true"]), 8, "cuda")
    assert plain.peak > ckpt.peak > tiled.peak > offload.peak
    assert offload.host > 0 and offload.activations < tiled.activations
    # sharded state: 16 B per parameter over 8 ranks
    assert abs(plain.state / (16 * Shape.of(compose_config(base).model).params() / 8) - 1) < 0.01


def test_the_engine_that_really_holds_the_model_decides():
    """One rank holds the bare fp32 model whatever engine is named (as ``build_engine`` does), except
    DeepSpeed inside a process group; fsdp2 keeps every block's unsharded gradients while gradient
    sync is off between accumulation steps, and every block gathered without resharding."""
    local = estimate(compose_config(["data.seq_len=1024"]), 1)
    for engine in (["engine=fsdp2", "engine.mixed_precision=bf16"], ["engine=deepspeed"]):
        one = estimate(compose_config(["data.seq_len=1024", *engine]), 1, distributed=False)
        assert one.peak == local.peak and one.params == local.params
    assert estimate(compose_config(["data.seq_len=1024", "engine=deepspeed"]), 1).optimizer != local.optimizer
    base = ["model=llama_1b", "data.seq_len=8192", "engine=fsdp2"]
    plain = estimate(compose_config(base), 8, "cuda")
    accum = estimate(compose_config(base + ["trainer.grad_accum=4"]), 8, "cuda")
    kept = estimate(compose_config(base + ["engine.reshard_after_forward=false"]), 8, "cuda")
    layers = Shape.of(compose_config(base).model)
    assert accum.peak - plain.peak == (layers.layers - 1) * layers.layer_params() * 4
    assert kept.peak - plain.peak == (layers.layers - 2) * layers.layer_params() * 4
    offloaded = estimate(compose_config(base + ["engine.cpu_offload=true"]), 8, "cuda")
    assert offloaded.params == offloaded.grads == offloaded.optimizer == 0 and offloaded.peak < plain.peak


def test_sequence_sharding_divides_the_activations():
    one = estimate(compose_config(["data.seq_len=65536"]), 1)
    four = estimate(compose_config(["data.seq_len=65536", "cp=striped", "cp.size=4"]), 4)
    assert four.tokens_per_rank == 16384
    assert 3.0 < one.activations / four.activations < 4.1


def test_norm_bytes_follow_the_compute_dtype():
    shape = Shape.of(compose_config([]).model)
    assert norm_saved_bytes(shape, Dtypes(4, 4, 4, 4)) == 12 * shape.dim + 4
    assert norm_saved_bytes(shape, Dtypes(8, 8, 8, 8)) == 24 * shape.dim + 8
    # autocast: each projection keeps its own bf16 cast of the output
    assert norm_saved_bytes(shape, Dtypes(4, 2, 4, 4), consumers=3) == 14 * shape.dim + 4


def test_check_fits_refuses_with_the_knobs_that_fit(monkeypatch):
    cfg = compose_config(["model=llama_1b", "data.seq_len=65536", "model.activation_checkpointing=false"])
    est = estimate(cfg, 1)
    with_ckpt = estimate(compose_config(["model=llama_1b", "data.seq_len=65536"]), 1)
    capacity = (est.peak + with_ckpt.peak) // 2
    monkeypatch.setattr("lctrain.memory.check.device_capacity", lambda device, local: capacity)
    with pytest.raises(ValueError) as err:
        check_fits(cfg, 1, torch.device("cpu"), 1)
    message = str(err.value)
    assert "model.activation_checkpointing=true" in message and "trainer.memory_check=false" in message
    assert fitting_knobs(cfg, 1, "cpu", capacity)[0] == "model.activation_checkpointing=true"
    cfg.trainer.memory_check = False
    assert check_fits(cfg, 1, torch.device("cpu"), 1)[0].peak == est.peak


def test_check_fits_names_more_ranks_when_no_knob_is_enough(monkeypatch):
    monkeypatch.setattr("lctrain.memory.check.device_capacity", lambda device, local: 1 << 20)
    with pytest.raises(ValueError, match="larger cp.size"):
        check_fits(compose_config(["data.seq_len=65536"]), 1, torch.device("cpu"), 1)


@pytest.mark.parametrize("experiment,shape,gpus", [
    ("extend_llama32_1b_128k", "llama_1b", 8),
    ("extend_llama3_8b_1m", "llama3_8b", 8),
])
def test_gpu_recipes_fit_80gb_gpus_by_the_estimate(tmp_path, experiment, shape, gpus):
    """The shipped GPU recipes pass their own start-up fit check on 8 x H100 80GB (79.6 GiB each;
    the model preset of the same shape stands in for the Hugging Face directory)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x")
    cfg = compose_config([f"experiment={experiment}", f"model={shape}", f"data.path={corpus}", "data.tokenizer=byte",
                          "model.vocab_size=128256"])
    est = estimate(cfg, gpus, "cuda")
    assert est.peak < 79.6 * 2**30, est.summary()


GPU_PASSKEY_STAGES = [[], ["data.seq_len=131072", "data.docs_per_seq=8"], ["data.seq_len=131072", "data.docs_per_seq=1"]]


@pytest.mark.parametrize("stage", GPU_PASSKEY_STAGES, ids=["32k", "128k_docs16k", "128k"])
def test_gpu_passkey_stages_validate_and_fit_80gb_gpus(stage):
    """The README's GPU passkey stages on 8 GPUs compose, validate and pass the start-up fit check
    of an 80 GB H100 (79.6 GiB, 90% usable) by the estimate."""
    from lctrain.config import validate

    cfg = compose_config(["experiment=gpu_passkey", *stage])
    assert validate(cfg, 8) == 1
    est = estimate(cfg, 8, "cuda")
    assert est.peak < 0.9 * 79.6 * 2**30, est.summary()
