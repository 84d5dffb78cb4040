"""What makes a checkpoint part of a run, and what a resume may change.

Every checkpoint records its run (``run_id``, inherited by every resume of it) and the config
fields below as flat ``group.key`` values. Resuming compares them with the new config:

- model shape fields must match exactly (the tensors would not fit otherwise);
- the other model fields, the data fields and the schedule (steps, batch, seed, optimizer)
  must match unless ``trainer.resume_allow_changes`` lists them, e.g.
  ``trainer.resume_allow_changes=[trainer.steps,data.seq_len]``.

Everything else (logging, eval, checkpoint cadence, threads, kernels, the cp strategy and its
degree: model state does not depend on them) may change freely.
"""

from __future__ import annotations

from omegaconf import OmegaConf

SHAPE_FIELDS = tuple(f"model.{k}" for k in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads",
                                              "ffn_dim", "tie_embeddings", "qkv_bias"))
MODEL_FIELDS = tuple(f"model.{k}" for k in ("rope_theta", "rope_scaling", "norm_eps", "init_std", "window"))
SCHEDULE_FIELDS = ("trainer.steps", "trainer.seed", "trainer.micro_batch_size", "trainer.grad_accum",
                   "optim.lr", "optim.min_lr_ratio", "optim.weight_decay", "optim.betas", "optim.eps",
                   "optim.warmup_steps", "optim.grad_clip")
GROUPS_OF_DATA = ("data",)  # every data.* field


def identity_fields(cfg) -> dict:
    """The recorded config values (flat ``group.key``), plain JSON types."""
    container = OmegaConf.to_container(cfg, resolve=True)
    fields = {name: _get(container, name) for name in SHAPE_FIELDS + MODEL_FIELDS + SCHEDULE_FIELDS}
    for group in GROUPS_OF_DATA:
        fields.update({f"{group}.{key}": value for key, value in container[group].items()})
    return fields


def _get(container: dict, dotted: str):
    group, key = dotted.split(".", 1)
    return container[group][key]


def check_compatible(saved: dict, current: dict, allowed, path) -> list[str]:
    """ValueError listing the differences a resume may not carry; returns the allowed ones."""
    # A field the checkpoint predates is not compared (it was written before lctrain had it).
    differ = sorted(k for k in set(saved) if saved.get(k) != current.get(k))
    shape = [k for k in differ if k in SHAPE_FIELDS]
    if shape:
        raise ValueError(
            f"checkpoint {path} holds a model of another shape: "
            + ", ".join(f"{k}={saved.get(k)!r} there, {current.get(k)!r} here" for k in shape)
            + "; resume with the model it was trained with, or train in a fresh trainer.checkpoint_dir")
    refused = [k for k in differ if k not in set(allowed)]
    if refused:
        raise ValueError(
            f"resuming {path} would change " + ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
                                                        for k in refused)
            + f"; to resume anyway list them: trainer.resume_allow_changes=[{','.join(refused)}], or train "
              f"in a fresh trainer.checkpoint_dir")
    return differ
