"""Hugging Face checkpoints in and out: Llama (2, 3, 3.1, 3.2), Qwen2 / Qwen2.5 and Mistral.

lctrain's ``Llama`` computes what transformers' ``LlamaForCausalLM`` does (rotate-half RoPE, the
same GQA head order, eps inside the rsqrt, ``down(silu(gate) * up)``), so converting is renaming
tensors. ``model=hf model.path=DIR`` reads ``DIR/config.json`` into the model fields
(``apply_hf_config``) and the safetensors (one file, or shards listed in
``model.safetensors.index.json``) into the built model (``load_hf_weights``); anything lctrain
cannot represent exactly is a ValueError naming the field. ``export_hf`` writes the reverse: a
directory ``from_pretrained`` loads, with the RoPE parameters the model was trained with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
INDEX = "model.safetensors.index.json"
# lctrain name pattern -> Hugging Face name pattern ({i}: the layer)
_LAYER_NAMES = {
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj", "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj",
    "mlp.w_down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}


def hf_name(name: str) -> str:
    """The Hugging Face tensor name of an lctrain parameter name."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    _, index, rest = name.split(".", 2)
    module, leaf = rest.rsplit(".", 1)
    return f"model.layers.{index}.{_LAYER_NAMES[module]}.{leaf}"


# ------------------------------------------------------------------------------------ config
def read_hf_config(path: str | Path) -> dict:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"model.path={path}: no config.json there (a Hugging Face model directory holds "
                         f"config.json and *.safetensors)")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON ({err})") from None


def _refuse(field: str, value, why: str):
    raise ValueError(f"config.json {field}={value!r}: {why}; lctrain cannot represent this model exactly")


def model_fields(hf: dict) -> dict:
    """lctrain ``model.*`` fields of a Hugging Face config (ValueError on what does not map)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        _refuse("model_type", family, f"supported families are {', '.join(FAMILIES)}")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // heads):
        _refuse("head_dim", hf["head_dim"], f"lctrain's head dim is hidden_size / num_attention_heads = {dim // heads}")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "lctrain's MLP is SwiGLU (silu)")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(key):
            _refuse(key, hf[key], "mixture-of-experts layers are not supported")
    if hf.get("mlp_bias"):
        _refuse("mlp_bias", True, "lctrain's MLP has no biases")
    if family == "llama" and hf.get("attention_bias"):
        _refuse("attention_bias", True, "lctrain's Llama attention has no biases")
    window = 0
    if family == "mistral" and hf.get("sliding_window"):
        window = int(hf["sliding_window"])
    if family == "qwen2" and hf.get("use_sliding_window"):
        _refuse("use_sliding_window", True, "Qwen2's per-layer sliding window is not supported")
    theta, scaling = rope_fields(hf)
    return {"name": "hf", "vocab_size": hf["vocab_size"], "dim": dim, "num_layers": hf["num_hidden_layers"],
            "num_heads": heads, "num_kv_heads": hf.get("num_key_value_heads") or heads,
            "ffn_dim": hf["intermediate_size"], "rope_theta": theta, "norm_eps": hf.get("rms_norm_eps", 1e-6),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "window": window,
            "qkv_bias": family == "qwen2", "rope_scaling": scaling}


def rope_fields(hf: dict) -> tuple[float, dict]:
    """(rope_theta, model.rope_scaling fields) from either config.json layout (``rope_scaling`` +
    ``rope_theta``, or transformers 5's ``rope_parameters``)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse("partial_rotary_factor", params.get("partial_rotary_factor", hf.get("partial_rotary_factor")),
                "lctrain rotates the whole head")
    if kind == "default":
        return theta, {"type": "none"}
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        _refuse("rope_type", kind, "supported: default, linear, dynamic, yarn, llama3")
    out = {"type": kind, "factor": float(params["factor"])}
    if kind == "dynamic":  # transformers scales against max_position_embeddings
        out["original_max_len"] = int(hf["max_position_embeddings"])
    if kind in ("yarn", "llama3"):
        out["original_max_len"] = int(params.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    if kind == "llama3":
        out.update(low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]))
    if kind == "yarn":
        if params.get("mscale") or params.get("mscale_all_dim"):
            _refuse("rope_scaling.mscale", params.get("mscale"), "DeepSeek's yarn mscale variant is not supported")
        out.update(beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                   attention_factor=float(params.get("attention_factor") or 0.0),
                   truncate=bool(params.get("truncate", True)))
    return theta, out


def apply_hf_config(cfg) -> None:
    """``model=hf``: fill ``cfg.model`` from ``model.path``'s config.json (and point ``data.tokenizer=hf``
    at its tokenizer.json when no path is given). The shape always comes from the file; RoPE too
    unless the run sets its own (``model.rope_theta`` non-zero, ``model.rope_scaling.type`` other than
    ``auto``: context extension), whose ``original_max_len`` defaults to the file's
    ``max_position_embeddings``. Idempotent; nothing happens for other models."""
    if cfg.model.name != "hf":
        return
    if not cfg.model.path:
        raise ValueError("model=hf needs model.path=<directory with config.json and *.safetensors>")
    from dataclasses import asdict

    from lctrain.config import RopeScalingConfig

    hf = read_hf_config(cfg.model.path)
    for key, value in model_fields(hf).items():
        if key == "rope_theta" and cfg.model.rope_theta:
            continue  # the run's own base (ABF context extension)
        if key == "rope_scaling":
            if cfg.model.rope_scaling.type != "auto":  # the run's own scaling; its length defaults to the model's
                if not cfg.model.rope_scaling.original_max_len:
                    cfg.model.rope_scaling.original_max_len = int(hf.get("max_position_embeddings") or 0)
                continue
            for field, default in {**asdict(RopeScalingConfig()), **value}.items():  # config.json's, whole
                cfg.model.rope_scaling[field] = default
        else:
            cfg.model[key] = value
    if cfg.data.tokenizer == "hf" and not cfg.data.tokenizer_path:
        cfg.data.tokenizer_path = str(Path(cfg.model.path) / "tokenizer.json")


# ------------------------------------------------------------------------------------ weights
def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model.path={path}: no *.safetensors (nor {INDEX}) to read the weights from")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{index} lists {', '.join(missing)}, which is missing from {path}")
    return files


def open_hf_tensors(path: str | Path, stack) -> dict:
    """name -> an open safetensors handle holding it, for every file of the directory; every
    file is opened (and so checked whole: a truncated or damaged one is a ValueError naming it)
    before anything is read. No pickle is involved."""
    from safetensors import SafetensorError, safe_open

    handles = {}
    for file in _weight_files(Path(path)):
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{file} cannot be read ({err}): a truncated or damaged file; nothing was loaded") from None
        handles.update({name: handle for name in handle.keys()})
    return handles


def _local_rows(p: torch.Tensor) -> slice | None:
    """The rows of dim 0 a sharded (DTensor) parameter keeps on this rank; None: the whole tensor."""
    if not hasattr(p, "to_local"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if any(o for o in offset[1:]) or tuple(shape[1:]) != tuple(p.shape[1:]):
        raise ValueError(f"a parameter sharded along dim > 0 ({p.placements}) cannot be read by rows")
    return slice(offset[0], offset[0] + shape[0])


def load_hf_weights(path: str | Path, model: torch.nn.Module) -> None:
    """The directory's weights into ``model`` (cast to its dtype), every name and shape checked
    before any is copied. A sharded model (fsdp2's DTensor parameters) reads only the rows each
    rank keeps."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        handles = open_hf_tensors(path, stack)
        params = dict(model.named_parameters())
        problems = []
        for name, p in params.items():
            source = hf_name(name)
            if source not in handles:
                problems.append(f"{source} is missing")
                continue
            shape = tuple(handles[source].get_slice(source).get_shape())
            if shape != tuple(p.shape):
                problems.append(f"{source} has shape {shape}, the model {tuple(p.shape)}")
        used = {hf_name(n) for n in params} | ({"lm_head.weight"} if "lm_head.weight" not in params else set())
        extra = sorted(k for k in handles if k not in used and not k.endswith("rotary_emb.inv_freq"))
        if extra:
            problems.append(f"tensors the model has no place for: {', '.join(extra[:5])}"
                            + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
        if problems:
            raise ValueError(f"model.path={path} does not match config.json's model: " + "; ".join(problems)
                             + "; nothing was loaded")
        with torch.no_grad():
            for name, p in params.items():
                source, rows = hf_name(name), _local_rows(p)
                tensor = handles[source].get_tensor(source) if rows is None else handles[source].get_slice(source)[rows]
                target = p.to_local() if rows is not None else p
                target.copy_(tensor.to(target.dtype))


# ------------------------------------------------------------------------------------ export
def hf_config(model_cfg, context_len: int, dtype: str) -> dict:
    """config.json for lctrain ``model.*`` fields trained at ``context_len`` tokens."""
    m = model_cfg
    family = "qwen2" if m.qkv_bias else ("mistral" if m.window else "llama")
    scaling = m.rope_scaling
    out = {
        "architectures": [FAMILIES[family]], "model_type": family, "vocab_size": m.vocab_size,
        "hidden_size": m.dim, "intermediate_size": m.ffn_dim, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.dim // m.num_heads,
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "tie_word_embeddings": bool(m.tie_embeddings), "max_position_embeddings": int(context_len),
        "torch_dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype], "rope_scaling": None,
    }
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if family == "mistral":
        out["sliding_window"] = int(m.window)
    if family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    kind = scaling.type
    if kind == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": scaling.factor}
    elif kind == "dynamic":  # transformers scales against max_position_embeddings
        out["rope_scaling"] = {"rope_type": "dynamic", "factor": scaling.factor}
        out["max_position_embeddings"] = int(scaling.original_max_len)
    elif kind == "yarn":
        out["rope_scaling"] = {"rope_type": "yarn", "factor": scaling.factor, "beta_fast": scaling.beta_fast,
                               "beta_slow": scaling.beta_slow, "truncate": bool(scaling.truncate),
                               "original_max_position_embeddings": int(scaling.original_max_len)}
        if scaling.attention_factor:
            out["rope_scaling"]["attention_factor"] = scaling.attention_factor
    elif kind == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": scaling.factor,
                               "low_freq_factor": scaling.low_freq_factor,
                               "high_freq_factor": scaling.high_freq_factor,
                               "original_max_position_embeddings": int(scaling.original_max_len)}
    if out["rope_scaling"] is not None and not math.isfinite(out["rope_scaling"]["factor"]):
        raise ValueError(f"model.rope_scaling.factor={scaling.factor} cannot be exported")
    return out


def export_hf(model: torch.nn.Module, model_cfg, context_len: int, out_dir: str | Path, dtype: str = "bf16",
              tokenizer_files: tuple[Path, ...] = ()) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files) for ``from_pretrained``;
    written to ``out_dir.partial`` and renamed, so a kill never leaves half an export."""
    import os
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    cast = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tensors = {hf_name(n): p.detach().to("cpu", cast).contiguous() for n, p in model.named_parameters()}
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    (partial / "config.json").write_text(json.dumps(hf_config(model_cfg, context_len, dtype), indent=2))
    for file in tokenizer_files:
        shutil.copy2(file, partial / file.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out
