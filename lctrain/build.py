"""The one place that turns the typed config into objects: model, tokenizer, dataset, dtypes.

The train and decode entry points both build through here, so a config field and the
constructor argument it feeds cannot drift apart (``tests/unit/test_build.py`` builds every
dataset and model preset from composed configs).
"""

from __future__ import annotations

import torch

from lctrain.data import build_dataset, build_tokenizer
from omegaconf import OmegaConf

from lctrain.models.llama import CoreAttention, Llama, LlamaShape
from lctrain.models.rope import RopeScaling

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
DTYPE_NAMES = ("auto", *DTYPES)


def model_shape(model, context_len: int = 0) -> LlamaShape:
    """The ``LlamaShape`` of a ``ModelConfig``; ``context_len``: the sequence length it runs at
    (dynamic RoPE scaling fixes its base there)."""
    scaling = RopeScaling(**OmegaConf.to_container(OmegaConf.create(model.rope_scaling))) \
        if model.rope_scaling is not None else None
    return LlamaShape(vocab_size=model.vocab_size, dim=model.dim, num_layers=model.num_layers,
                      num_heads=model.num_heads, num_kv_heads=model.num_kv_heads, ffn_dim=model.ffn_dim,
                      rope_theta=model.rope_theta, norm_eps=model.norm_eps, tie_embeddings=model.tie_embeddings,
                      init_std=model.init_std, window=model.window or None, qkv_bias=model.qkv_bias,
                      rope_scaling=scaling if scaling is not None and scaling.type != "none" else None,
                      rope_context_len=context_len, mlp_tile_tokens=model.mlp_tile_tokens)


def build_model(model, attention: CoreAttention, vocab_size_needed: int = 0, context_len: int = 0) -> Llama:
    """The Llama a ``ModelConfig`` describes, its attention slot filled with ``attention``."""
    if model.vocab_size < vocab_size_needed:
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size_needed}; set model.vocab_size={vocab_size_needed} or larger")
    return Llama(model_shape(model, context_len), attention, activation_checkpointing=model.activation_checkpointing,
                 checkpoint_every=model.checkpoint_every, activation_offload=model.activation_offload)


def build_data(data):
    """(tokenizer, dataset) of a ``DataConfig``."""
    tokenizer = build_tokenizer(data.tokenizer, data.tokenizer_path)
    return tokenizer, build_dataset(data, tokenizer)


def training_dtypes(name: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None) for ``trainer.dtype``."""
    if name == "auto":
        return torch.float32, (torch.bfloat16 if device.type == "cuda" else None)
    if name == "bfloat16":  # fp32 master weights, bf16 compute
        return torch.float32, torch.bfloat16
    return DTYPES[name], None
