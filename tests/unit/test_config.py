"""Hydra configs: every group option composes onto the typed schema, bad overrides fail, validate, run ids."""

import importlib.resources
import json
import re
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from lctrain.config import TrainConfig, register_configs, run_id, validate
from lctrain.interop.hf import apply_hf_config

GROUPS = ("model", "data", "cp", "kernel", "optim", "logger", "experiment")
RUN_ENV = ("LCTRAIN_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")
# Options a plain `group=option` cannot satisfy alone, and the override that completes them.
# A Hugging Face model directory needs only its config.json to compose and validate.
HF_DIR = tempfile.mkdtemp(prefix="lctrain-hf-config-")
Path(HF_DIR, "config.json").write_text(json.dumps({
    "model_type": "llama", "vocab_size": 300, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 128, "rope_theta": 500000.0}))
NEEDS = {("data", "text"): ["data.path=/tmp/corpus.txt"], ("model", "hf"): [f"model.path={HF_DIR}"],
         **{("experiment", e): [f"model.path={HF_DIR}", "data.path=/tmp/corpus.txt"]
            for e in ("extend_llama32_1b_128k", "extend_llama3_8b_1m")},
         ("experiment", "extend_cpu_tiny"): [f"model.path={HF_DIR}"]}


def conf_root():
    return importlib.resources.files("lctrain.conf")


def options(group):
    return sorted(p.name[: -len(".yaml")] for p in (conf_root() / group).iterdir() if p.name.endswith(".yaml"))


def load_yaml(group, option):
    raw = OmegaConf.create((conf_root() / group / f"{option}.yaml").read_text())
    raw.pop("defaults", None)
    return raw


def compose_train(overrides=(), return_hydra_config=False):
    register_configs()
    with initialize_config_module(config_module="lctrain.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def assert_subset(expected, actual, where):
    """Every key of the YAML `expected` has the same value in the composed `actual`."""
    for key, value in expected.items():
        assert key in actual, f"{where}.{key} missing from composed config"
        if OmegaConf.is_dict(value):
            assert_subset(value, actual[key], f"{where}.{key}")
        else:
            got = actual[key]
            got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            want = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            assert got == want, f"{where}.{key}: yaml says {want!r}, composed {got!r}"


@pytest.fixture(autouse=True)
def _clean_run_env(monkeypatch):
    for name in RUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no yaml options"
    assert set(options("model")) >= {"tiny", "llama_150m", "llama_1b", "llama3_8b"}
    assert "cpu_demo" in options("experiment")


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_every_option_composes_and_validates(group, option):
    extra = NEEDS.get((group, option), [])
    cfg = compose_train([f"{group}={option}", *extra])
    assert OmegaConf.get_type(cfg) is TrainConfig  # merged onto the typed schema
    values = load_yaml(group, option)
    for override in extra:  # keys set on the command line are not the yaml's to check
        key = override.split("=")[0]
        if group == "experiment":
            values[key.split(".")[0]].pop(key.split(".", 1)[1], None)
            continue
        assert key.startswith(f"{group}.")
        values.pop(key[len(group) + 1:])
    if group == "experiment":  # @package _global_
        assert_subset(values, cfg, "")
    else:
        assert_subset(values, cfg[group], group)
    apply_hf_config(cfg)  # model=hf: the shape from config.json, as train.py does before validating
    cp = cfg.cp.size  # a world of cp ranks is one dp replica, twice that is two
    assert validate(cfg, cp) == 1
    assert validate(cfg, 2 * cp) == 2


def test_defaults_are_tiny_passkey_none_torch():
    cfg = compose_train()
    assert (cfg.model.name, cfg.data.name, cfg.cp.strategy, cfg.kernel.name, cfg.logger.name) == (
        "tiny", "passkey", "none", "torch", "none",
    )
    assert validate(cfg, 1) == 1


def test_llama3_8b_values_come_from_yaml():
    cfg = compose_train(["model=llama3_8b"])
    m = cfg.model
    assert (m.dim, m.num_layers, m.num_heads, m.num_kv_heads) == (4096, 32, 32, 8)
    assert (m.vocab_size, m.ffn_dim, m.rope_theta) == (128256, 14336, 500000.0)
    assert m.tie_embeddings is False and m.activation_checkpointing is True
    # Keys the yaml leaves out keep the schema defaults.
    assert m.norm_eps == 1e-5 and m.loss_chunk_tokens == 4096


def test_cpu_demo_experiment():
    cfg = compose_train(["experiment=cpu_demo"])
    assert cfg.model.name == "tiny" and cfg.model.dim == 128
    assert cfg.data.name == "recall" and cfg.data.seq_len >= 4096 and cfg.data.recall_curriculum_samples > 0
    assert cfg.trainer.steps >= 100 and (cfg.cp.strategy, cfg.cp.layout, cfg.cp.size) == ("ring", "striped", 2)
    assert validate(cfg, 2) == 1
    # Command-line overrides still win over the experiment.
    cfg = compose_train(["experiment=cpu_demo", "trainer.steps=5", "data.seq_len=512"])
    assert cfg.trainer.steps == 5 and cfg.data.seq_len == 512


def test_override_values_are_typed():
    cfg = compose_train(["trainer.steps=7", "optim.lr=1e-4", "model.tie_embeddings=false"])
    assert cfg.trainer.steps == 7 and isinstance(cfg.trainer.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.model.tie_embeddings is False


def _chain(err):
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("override,needle", [
    ("trainer.stepz=3", "trainer.stepz"),
    ("model.dimm=8", "model.dimm"),
])
def test_unknown_key_fails(override, needle):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train([override])
    assert needle in _chain(info.value)


@pytest.mark.parametrize("override,needle", [
    ("trainer.steps=abc", "trainer.steps"),
    ("model.dim=1.5", "model.dim"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings"),
])
def test_wrong_type_fails(override, needle):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train([override])
    assert needle in _chain(info.value)


def test_unknown_group_option_fails():
    with pytest.raises(MissingConfigException) as info:
        compose_train(["model=nope"])
    message = str(info.value)
    assert "model/nope" in message and "llama3_8b" in message  # lists the valid options


@pytest.mark.parametrize("overrides,world,needle", [
    (["trainer.dp=3"], 2, "trainer.dp=-1"),
    (["trainer.dp=1"], 2, re.escape("world size 2 != dp (1) x cp (1)")),
    (["cp.size=2"], 2, "cp.size=1"),
    (["kernel.name=foo"], 1, "kernel.name='foo'"),
    (["cp.strategy=ringg"], 1, "cp.strategy"),
    (["trainer.dtype=fp8"], 1, "trainer.dtype"),
    (["data=text"], 1, "data.path="),
    (["model.num_kv_heads=3"], 1, "num_kv_heads"),
    (["model.dim=130"], 1, "model.dim"),
    (["model.dim=12", "model.num_heads=4", "model.num_kv_heads=2"], 1, "even head_dim"),
    (["trainer.steps=-1"], 1, "trainer.steps"),
    (["model.activation_offload=true"], 1, "set model.activation_checkpointing=true too"),
    (["model.checkpoint_every=0"], 1, "model.checkpoint_every"),
    (["model.mlp_tile_tokens=-4"], 1, "model.mlp_tile_tokens"),
    (["model.rope_scaling.type=ntk"], 1, "model.rope_scaling.type="),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"], 1, "original_max_len"),
    (["data.seq_len=1"], 1, "data.seq_len"),
    (["data.tokenizer=hf"], 1, "data.tokenizer_path="),
    (["optim.betas=[0.9]"], 1, "optim.betas"),
    # heads that the Ulysses degree cannot split; a cp size the usp degree does not divide
    (["cp=ulysses", "cp.size=3"], 3, re.escape("Ulysses degrees that work: [1, 2, 4]")),
    (["cp=usp", "cp.size=6", "cp.ulysses_size=4"], 6, re.escape("must divide the cp size (6)")),
    (["cp=usp", "cp.ulysses_size=3", "cp.size=6"], 6, "Ulysses degrees that work"),
    # sequence lengths no padding policy allows, or that cp.padding=none refuses
    (["cp=striped", "cp.size=4", "data.seq_len=3"], 4, "data.seq_len >= 4"),
    (["cp=zigzag", "cp.padding=none", "data.seq_len=250"], 2, "data.seq_len=252 or cp.padding=pad"),
    (["cp.padding=maybe"], 1, "cp.padding"),
])
def test_validate_names_the_fix(overrides, world, needle):
    cfg = compose_train(overrides)
    with pytest.raises(ValueError, match=needle):
        validate(cfg, world)


@pytest.mark.parametrize("world", [1, 2, 8])
def test_validate_data_parallel_degree(world):
    assert validate(compose_train(["trainer.dp=-1"]), world) == world  # world // cp.size
    assert validate(compose_train([f"trainer.dp={world}"]), world) == world


def test_run_id_sources(monkeypatch):
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", run_id())
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_id() == "slurm-4242"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default when no --rdzv-id
    assert run_id() == "slurm-4242"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv7")
    assert run_id() == "torchrun-rdzv7"
    monkeypatch.setenv("LCTRAIN_RUN_ID", "mine")
    assert run_id() == "mine"
    monkeypatch.setenv("LCTRAIN_RUN_ID", "")  # empty means unset
    assert run_id() == "torchrun-rdzv7"


def test_run_dir_and_output_subdir_resolvers(monkeypatch):
    monkeypatch.setenv("LCTRAIN_RUN_ID", "unit-run")
    monkeypatch.setenv("RANK", "0")
    cfg = compose_train(return_hydra_config=True)
    assert cfg.hydra.run.dir == "outputs/unit-run"
    assert cfg.hydra.sweep.dir == "multirun/unit-run"
    assert cfg.hydra.output_subdir == ".hydra"
    monkeypatch.setenv("RANK", "3")
    assert compose_train(return_hydra_config=True).hydra.output_subdir is None


def test_runs_checkpoint_and_resume_by_default():
    """A run that is preempted or rerun loses nothing unless told otherwise."""
    t = compose_train().trainer
    assert t.checkpoint_every == 500 and t.save_final and t.resume == "auto"
    assert list(t.stop_signals) == ["SIGTERM", "SIGUSR1"] and t.comm_timeout_s == 300


def test_engine_choices_are_checked_before_any_process_group():
    assert validate(compose_train(["engine=fsdp2", "cp=striped", "cp.size=2"]), 2) == 1
    with pytest.raises(ValueError, match="disagg.ping_pong=false or use engine=ddp"):
        validate(compose_train(["engine=fsdp2", "cp=disagg"]), 2)
    with pytest.raises(ValueError, match="engine.mixed_precision"):
        validate(compose_train(["engine=fsdp2", "engine.mixed_precision=fp8"]), 1)


@pytest.mark.parametrize("overrides,needle", [
    (["engine.zero_stage=4"], "engine.zero_stage"),
    (["cp=disagg"], "cp=disagg keeps ranks that hold no model"),
    (["engine.zero_stage=2", "engine.offload_params=true"], "needs engine.zero_stage=3"),
    (["trainer.dtype=float64"], "trainer.dtype=float32"),
    (["engine.zero_stage=3", "data=passkey", "cp=ring", "cp.size=2", "trainer.decode_eval=ring"],
     "trainer.decode_eval=none or engine.zero_stage=1|2"),
])
def test_deepspeed_choices_are_checked_before_any_process_group(overrides, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        validate(compose_train(["engine=deepspeed", *overrides]), 2)


def test_deepspeed_config_is_generated_from_lctrain_fields_and_merged_with_ds_config():
    from lctrain.engines.deepspeed import ds_config

    cfg = compose_train(["engine=deepspeed", "engine.zero_stage=3", "engine.offload_optimizer=true",
                         "engine.mixed_precision=bf16", "trainer.grad_accum=4", "optim.grad_clip=0.5",
                         "+engine.ds_config.zero_optimization.overlap_comm=true"])
    assert validate(cfg, 4) == 4  # dp 4 x cp 1
    out = ds_config(cfg, 4)
    assert out["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                        "overlap_comm": True}
    assert out["gradient_accumulation_steps"] == 4 and out["gradient_clipping"] == 0.5
    assert out["bf16"] == {"enabled": True} and out["train_batch_size"] == 4 * 4 * cfg.trainer.micro_batch_size
