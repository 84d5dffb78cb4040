"""Hugging Face import / export against transformers itself: small random models saved with
``save_pretrained`` into a temp dir (no downloads), their logits compared with lctrain's on the
same tokens (float32), for packed documents, under cp = striped ring and ulysses over 2 gloo ranks,
and after a training round trip at twice the model's context with yarn scaling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lctrain.attention import build_attention  # noqa: E402
from lctrain.build import build_model  # noqa: E402
from lctrain.config import compose_config  # noqa: E402
from lctrain.distributed.spawn import run_ranks  # noqa: E402
from lctrain.interop.hf import apply_hf_config, load_hf_weights, model_fields  # noqa: E402
from lctrain.models.rope import RopeScaling, rope_cos_sin, rope_frequencies  # noqa: E402

VOCAB = 300  # >= the byte tokenizer's 259, so the built-in datasets run on these models
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-rope-llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": LLAMA3, "rope_theta": 500000.0}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2-untied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
}
RTOL = 1e-5


def save_random_model(directory: Path, family: str = "llama", seed: int = 0, **extra) -> torch.nn.Module:
    """A transformers model with every tensor random (biases and norms too), saved to ``directory``."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**SHAPE, **{**kwargs, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(directory, **({"max_shard_size": "40KB"} if extra.pop("_sharded", False) else {}))
    return model


def lctrain_model(directory: Path, context_len: int = 64):
    cfg = compose_config(["model=hf", f"model.path={directory}"])
    apply_hf_config(cfg)
    model = build_model(cfg.model, build_attention("none"), context_len=context_len).eval()
    load_hf_weights(directory, model)
    return model


def logits(model, ids, positions=None, doc_ids=None) -> torch.Tensor:
    positions = torch.arange(ids.shape[1])[None] if positions is None else positions
    doc_ids = torch.zeros_like(ids) if doc_ids is None else doc_ids
    with torch.no_grad():
        return torch.nn.functional.linear(model(ids, positions, doc_ids), model.output_weight)


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_same_logits(ours, hf, ids, what: str) -> None:
    """lctrain's logits equal transformers' on ``ids`` (max error relative to the largest logit)."""
    with torch.no_grad():
        ref = hf(ids).logits
    err = rel_err(logits(ours, ids), ref)
    print(f"{what}: max relative logit error {err:.2e}")
    assert err < RTOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_logits_equal_transformers(tmp_path, family):
    hf = save_random_model(tmp_path, family)
    ours = lctrain_model(tmp_path)
    assert_same_logits(ours, hf, torch.randint(0, VOCAB, (2, 40)), family)


def test_packed_documents_equal_transformers_document_by_document(tmp_path):
    hf = save_random_model(tmp_path, "qwen2-untied")
    ours = lctrain_model(tmp_path)
    lengths = [11, 20, 9]
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        ref = torch.cat([hf(d).logits for d in docs], dim=1)
    assert rel_err(logits(ours, packed, positions, doc_ids), ref) < RTOL


def _sharded_logits(rank, world, directory, strategy, engine):
    """One eval batch through the trainer (the user's path: model=hf, its weights, a cp strategy):
    this rank's logits and the global token positions it holds."""
    from tests.helpers.training import trainer

    t = trainer(["model=hf", f"model.path={directory}", f"cp={strategy}", "cp.size=2", "data.seq_len=128",
                 "trainer.dtype=float32", f"engine={engine}"], f"{directory}/run-{strategy}")
    sample = t.dataset.sample(0)
    batch = t._prepare({k: v[None] for k, v in sample.items()})
    t.model.eval()
    with torch.no_grad():
        out = torch.nn.functional.linear(t.model(batch["input_ids"], batch["position_ids"], batch["doc_ids"],
                                                 batch["token_pos"]), t.model.output_weight)
    t.close()
    return sample["input_ids"].tolist(), batch["token_pos"][0].tolist(), out[0].tolist()  # plain data crosses


# fsdp2: each rank reads only the rows of every tensor it keeps
@pytest.mark.parametrize("strategy,engine", [("striped", "fsdp2"), ("ulysses", "ddp")])
def test_imported_model_under_context_parallelism_equals_transformers(tmp_path, strategy, engine):
    hf = save_random_model(tmp_path, "llama-rope-llama3")
    results = run_ranks(_sharded_logits, 2, str(tmp_path), strategy, engine, timeout=300)
    ids = torch.tensor(results[0][0])
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    held = set()
    for _, token_pos, out in results:
        assert rel_err(torch.tensor(out), ref[token_pos]) < RTOL
        held |= set(token_pos)
    assert held == set(range(len(ids)))  # the two ranks hold the whole sequence between them


def test_sharded_safetensors_load_and_a_truncated_shard_loads_nothing(tmp_path):
    hf = save_random_model(tmp_path, "llama", _sharded=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert rel_err(logits(lctrain_model(tmp_path), ids), hf(ids).logits) < RTOL
    shard = tmp_path / sorted(set(index["weight_map"].values()))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = compose_config(["model=hf", f"model.path={tmp_path}"])
    apply_hf_config(cfg)
    model = build_model(cfg.model, build_attention("none"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="truncated or damaged file; nothing was loaded"):
        load_hf_weights(tmp_path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_mismatched_file_names_the_tensor_and_loads_nothing(tmp_path):
    save_random_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 64  # config.json no longer matches the tensors
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(48, 32\), the model \(64, 32\)"):
        lctrain_model(tmp_path)


def _hf_rope(kind: str, params: dict, seq_len=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(**SHAPE, rope_theta=params.pop("rope_theta", 10000.0),
                                      rope_scaling={"rope_type": kind, **params})
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("kind,params,ours", [
    ("linear", {"factor": 4.0}, RopeScaling("linear", 4.0)),
    ("dynamic", {"factor": 2.0}, RopeScaling("dynamic", 2.0, original_max_len=64)),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 16},
     RopeScaling("yarn", 4.0, original_max_len=16)),
    ("yarn", {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16.0, "beta_slow": 2.0,
              "attention_factor": 1.3, "truncate": False},
     RopeScaling("yarn", 8.0, original_max_len=32, beta_fast=16.0, beta_slow=2.0, attention_factor=1.3,
                 truncate=False)),
    ("llama3", dict(LLAMA3, rope_theta=500000.0), RopeScaling("llama3", 8.0, original_max_len=16)),
])
def test_every_rope_type_matches_transformers(kind, params, ours):
    theta = params.get("rope_theta", 10000.0)
    seq_len = 256 if kind == "dynamic" else None
    want, want_scale = _hf_rope(kind, dict(params), seq_len)
    got, scale = rope_frequencies(8, theta, ours, context_len=seq_len or 0)
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-7)
    assert rope_frequencies(8, theta)[1] == 1.0


def test_rope_angles_stay_accurate_at_a_million_positions():
    inv_freq, _ = rope_frequencies(128, 500000.0, RopeScaling("llama3", 8.0, original_max_len=8192))
    position = 2 ** 20 + 12345
    cos, sin = rope_cos_sin(torch.tensor([[position]]), inv_freq, torch.float32)
    exact = [(math.cos(position * f), math.sin(position * f)) for f in inv_freq.tolist()]
    assert max(abs(c - e[0]) for c, e in zip(cos[0, 0, 0, :64].tolist(), exact)) < 1e-6
    assert max(abs(s - e[1]) for s, e in zip(sin[0, 0, 0, :64].tolist(), exact)) < 1e-6


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"head_dim": 16}, "head_dim=16"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_local_experts": 8}, "num_local_experts=8"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 16}}, "mscale"),
])
def test_configs_lctrain_cannot_represent_are_refused_by_name(change, needle):
    hf = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
          "intermediate_size": 48, "vocab_size": VOCAB, "max_position_embeddings": 64, **change}
    with pytest.raises(ValueError, match="config.json .*" + __import__("re").escape(needle)):
        model_fields(hf)


def test_qwen2_per_layer_sliding_window_is_refused():
    hf = {"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
          "intermediate_size": 48, "vocab_size": VOCAB, "use_sliding_window": True}
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        model_fields(hf)


def test_extension_round_trip_train_at_twice_the_context_with_yarn_then_export(tmp_path):
    """The README's recipe on a tiny random model: import, 5 steps at 2x its context over 2 ranks
    (striped ring, yarn), export, and transformers' logits equal lctrain's on the trained weights."""
    import os
    import subprocess
    import sys

    from lctrain.checkpoint import find_step_dir
    from lctrain.decode.cli import load_model, run_config

    base = tmp_path / "base"
    save_random_model(base, "llama")
    env = {**os.environ, "LCTRAIN_RUN_ID": "ext", "PYTHONUNBUFFERED": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "lctrain.launch", "--nproc-per-node=2", "-m", "lctrain.train", "model=hf",
         f"model.path={base}", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=2", "data.seq_len=128",
         "cp=striped", "cp.size=2", "trainer.steps=5", "trainer.checkpoint_every=5", "trainer.eval_samples=2",
         "trainer.num_threads=1", "trainer.dtype=float32", "trainer.progress=false", "logger=none"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    run = tmp_path / "outputs" / "ext"
    export = subprocess.run([sys.executable, "-m", "lctrain.interop.export", str(run), str(tmp_path / "out"),
                             "--dtype", "fp32"], capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "truncate": True, "original_max_position_embeddings": 64}
    assert config["max_position_embeddings"] == 128
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    step_dir = find_step_dir(run)
    ours = load_model(step_dir, run_config(step_dir, None), torch.float32)
    trained = dict(ours.named_parameters())["layers.0.attn.wq.weight"]
    untrained = transformers.AutoModelForCausalLM.from_pretrained(base).model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(trained, untrained)  # the exported weights are the trained ones
    assert_same_logits(ours, hf, torch.randint(0, VOCAB, (1, 128)), "export round trip (yarn x2, 128 tokens)")


def test_steps_zero_only_evaluates_the_imported_model(tmp_path):
    """The 'before' measurement of the recipe: trainer.steps=0 runs the final eval and nothing else."""
    from lctrain.distributed import DistEnv
    from tests.helpers.training import trainer

    save_random_model(tmp_path / "base", "llama")
    t = trainer(["model=hf", f"model.path={tmp_path / 'base'}", "cp=none", "trainer.steps=0", "data.seq_len=128",
                 "trainer.dtype=float32"], tmp_path / "run", env=DistEnv(0, 1, 0, 1, torch.device("cpu"), None))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    summary = t.fit()
    t.close()
    assert summary["final/steps_run"] == 0 and math.isfinite(summary["eval/loss"]) and "eval/answer_acc" in summary
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def _word_tokenizer(path: Path, words: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3, **{f"w{i}": 4 + i for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.save(str(path))


def test_the_directory_tokenizer_is_used_and_checked_against_the_vocabulary(tmp_path):
    from lctrain.distributed import DistEnv
    from tests.helpers.training import trainer

    base = tmp_path / "base"
    save_random_model(base, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{i % 50}" for i in range(400)))
    over = ["model=hf", f"model.path={base}", "cp=none", "data=text", f"data.path={corpus}", "data.tokenizer=hf",
            "data.seq_len=64", "trainer.steps=1", "trainer.dtype=float32"]
    alone = DistEnv(0, 1, 0, 1, torch.device("cpu"), None)
    _word_tokenizer(base / "tokenizer.json", 100)  # 104 ids < the model's 300: it fits
    t = trainer(over, tmp_path / "ok", env=alone)
    assert t.cfg.data.tokenizer_path == str(base / "tokenizer.json") and math.isfinite(t.train_step())
    t.close()
    _word_tokenizer(base / "tokenizer.json", 400)  # 404 ids: more than the model embeds
    with pytest.raises(ValueError, match="smaller than the tokenizer's 404"):
        trainer(over, tmp_path / "too-big", env=alone)
