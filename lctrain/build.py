"""The one place that turns the typed config into objects: model, tokenizer, dataset, dtypes.

The train and decode entry points both build through here, so a config field and the
constructor argument it feeds cannot drift apart (``tests/unit/test_build.py`` builds every
dataset and model preset from composed configs).
"""

from __future__ import annotations

import torch

from lctrain.data import build_dataset, build_tokenizer
from lctrain.models.llama import CoreAttention, Llama, LlamaShape

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
DTYPE_NAMES = ("auto", *DTYPES)


def model_shape(model) -> LlamaShape:
    """The ``LlamaShape`` of a ``ModelConfig``."""
    return LlamaShape(vocab_size=model.vocab_size, dim=model.dim, num_layers=model.num_layers,
                      num_heads=model.num_heads, num_kv_heads=model.num_kv_heads, ffn_dim=model.ffn_dim,
                      rope_theta=model.rope_theta, norm_eps=model.norm_eps, tie_embeddings=model.tie_embeddings,
                      init_std=model.init_std, window=model.window or None)


def build_model(model, attention: CoreAttention, vocab_size_needed: int = 0) -> Llama:
    """The Llama a ``ModelConfig`` describes, its attention slot filled with ``attention``."""
    if model.vocab_size < vocab_size_needed:
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size_needed}; set model.vocab_size={vocab_size_needed} or larger")
    return Llama(model_shape(model), attention, activation_checkpointing=model.activation_checkpointing)


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
