"""engine=deepspeed: DeepSpeed ZeRO stage 1, 2 or 3 over every rank of the job (dp x cp).

ZeRO shards optimizer state (stage 1), then gradients (2), then parameters (3) over all ranks;
the cp ranks hold the same weights, so they shard them too. No DeepSpeed ``mpu`` is passed: its
sequence-parallel groups would average gradients over the cp ranks too, while the model keeps
its own cp groups for attention. DeepSpeed averages the reduced gradients over the ranks; the
trainer's loss is already normalised by the global token count, so the engine scales the loss by
the world size before the backward (and does not let DeepSpeed divide by the accumulation
steps), which makes the reduced gradients sums, as under ddp and fsdp2.

Set-up avoids anything that compiles: the client ``torch.optim.AdamW`` (no FusedAdam / CPU Adam
build) and no shared-memory inference all-reduce op. Under ZeRO-3 the parameters live in shards
outside any forward, so the trainer's loss (which reads the output weight after the model's
forward) runs inside the forward of a small wrapper module (``_RunInside``): DeepSpeed gathers
whatever a module's forward touches.

Checkpoints are DeepSpeed's own files (``deepspeed/`` inside lctrain's ``step_N`` directory, with
its digests and atomic rename), read back through ``torch.load(weights_only=True)`` with exactly
the three DeepSpeed classes its files hold allow-listed; next to them, the consolidated model
weights in DCP form, so ``trainer.init_from``, ``lctrain-generate`` and the other engines read a
deepspeed checkpoint's weights.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from lctrain.engines.base import Engine

DS_SUBDIR = "deepspeed"  # DeepSpeed's files inside a step directory
DS_TAG = "state"
MIXED = {"none": {}, "bf16": {"bf16": {"enabled": True}}, "fp16": {"fp16": {"enabled": True}}}


def import_deepspeed():
    """``deepspeed``, picking the CPU accelerator when there is no GPU; a ValueError naming the
    install when it is missing."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # gloo when oneCCL is absent
    try:
        import deepspeed
    except ImportError as err:
        raise ValueError(f"engine=deepspeed needs DeepSpeed ({err}); install the extra after torch: "
                         f"pip install -e '.[deepspeed]' (or pick engine=ddp / engine=fsdp2)") from None
    # Only DeepSpeed's inference all-reduce uses this op; building it takes minutes at start-up.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its per-step INFO lines would drown the trainer's
    # DeepSpeed's ZeRO gathers call torch's older collective name; nothing to act on here.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    return deepspeed


def safe_globals():
    """The classes DeepSpeed pickles into its checkpoint files besides tensors and plain data."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path, map_location=None):
    """A DeepSpeed checkpoint file without running code from it."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ValueError(f"{path}: refusing to unpickle an object outside DeepSpeed's checkpoint classes "
                         f"(damaged or crafted file); nothing was loaded ({first})") from None


def ds_config(cfg, world: int) -> dict:
    """The DeepSpeed JSON config lctrain's config implies, with ``engine.ds_config`` merged over it."""
    ec, tc = cfg.engine, cfg.trainer
    zero = {"stage": int(ec.zero_stage)}
    if ec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ec.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the client torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ... also when the optimizer state is offloaded
        "steps_per_print": 1 << 30,
        **MIXED[ec.mixed_precision],
    }
    from omegaconf import OmegaConf

    return _merge(config, OmegaConf.to_container(OmegaConf.create(ec.ds_config), resolve=True))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _nbytes(t) -> int:
    """Bytes of a tensor; 0 for anything else (a buffer DeepSpeed has not allocated)."""
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class _RunInside(torch.nn.Module):
    """``forward(fn, *args)`` = ``fn(model, *args)``: whatever ``fn`` touches of the model (the
    output weight after the model's own forward, too) is gathered by ZeRO-3 for it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    skips_nonfinite = True  # ZeRO's step finds a non-finite norm and skips the update

    def __init__(self, model, group, device, cfg):
        super().__init__(model)
        self.deepspeed = import_deepspeed()
        self.cfg, self.device = cfg, device
        self.stage = int(cfg.engine.zero_stage)
        self.world = dist.get_world_size()
        if group is not None and dist.get_world_size(group) != self.world:
            raise ValueError("engine=deepspeed shards over every rank of the job, but this strategy keeps some "
                             "ranks for attention only; use engine=ddp or engine=fsdp2")
        self.ds = None  # the DeepSpeed engine, built by ``attach`` once the optimizer exists

    # -------------------------------------------------------------- set-up
    def attach(self, optimizer, scheduler):
        self.deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self.ds, ds_optimizer, _, _ = self.deepspeed.initialize(
            model=_RunInside(self.model), optimizer=optimizer, config=ds_config(self.cfg, self.world),
            dist_init_required=False)
        self.ds.checkpoint_engine.load = safe_load  # nothing from a checkpoint file runs as code
        return ds_optimizer, scheduler

    def call(self, fn, *args):
        return self.ds(fn, *args)

    call_eval = call  # ZeRO-3 gathers the weights only inside its forward

    # -------------------------------------------------------------- step
    @contextmanager
    def accumulate(self, last: bool):
        self.ds.set_gradient_accumulation_boundary(last)  # reduce (stage 1) / finish reducing on the last
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages over the ranks; the loss is already normalised over the global batch.
        self.ds.backward(loss * self.world, scale_wrt_gas=False)

    def local_grads(self) -> list[torch.Tensor]:
        return []  # held inside DeepSpeed's partitions; a non-finite norm makes it skip the step

    def optimizer_step(self, optimizer, scheduler, max_norm: float) -> float:
        if self.measured is None:
            grads = self._grad_bytes()
        self.ds.step()  # clips to gradient_clipping (= optim.grad_clip), steps, zeroes the gradients
        norm = self.ds.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        if self.ds.was_step_applied():
            scheduler.step()
        if self.measured is None:
            self.measured = {**self.state_bytes(optimizer), "grads": grads}
        return norm

    # -------------------------------------------------------------- memory
    def state_bytes(self, optimizer) -> dict[str, int]:
        """Parameters as stored (the local ZeRO-3 shard, else the whole replica) plus the fp32
        master partition DeepSpeed keeps; optimizer state of the partition; gradient storage."""
        opt = self.ds.optimizer
        params = sum(_nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _nbytes(p) for p in self.model.parameters())
        masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat",
                                                                                   [])
        params += sum(_nbytes(m) for m in masters)
        inner = getattr(opt, "optimizer", opt)
        optim = sum(_nbytes(v) for s in inner.state.values() for v in s.values())
        return {"params": params, "grads": self._grad_bytes(), "optimizer": optim}

    def _grad_bytes(self) -> int:
        opt = self.ds.optimizer
        held = sum(_nbytes(p.grad) for p in self.model.parameters())  # whole gradients, until reduced
        # the reduced partition: one flat buffer (stage 2 contiguous / stage 3), else per-tensor pieces
        flat = [getattr(opt, name, None) for name in ("grads_in_partition", "grad_partitions_flat_buffer")]
        if any(isinstance(t, torch.Tensor) for t in flat):
            return held + sum(_nbytes(t) for t in flat)
        return held + sum(_nbytes(g) for group in getattr(opt, "averaged_gradients", {}).values() for g in group or ())

    # -------------------------------------------------------------- checkpoints
    def save_files(self, directory: Path, rank: int) -> dict[str, torch.Tensor] | None:
        """Every rank: DeepSpeed's files and this rank's RNG under ``directory/deepspeed``. Returns
        the whole model state dict on rank 0 (None elsewhere) for the consolidated weights."""
        ds_dir = directory / DS_SUBDIR
        self.ds.save_checkpoint(str(ds_dir), tag=DS_TAG, save_latest=False)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, ds_dir / f"rng_rank{rank}.pt")
        return self.full_state_dict(rank)

    def full_state_dict(self, rank: int) -> dict[str, torch.Tensor] | None:
        """The model's weights, whole, on rank 0 (host memory); every rank takes part in the gathers."""
        out = {}
        for name, p in self.model.named_parameters():
            with self.deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_tensor")):
                if rank == 0:
                    out[name] = p.detach().to("cpu", copy=True)
        return out if rank == 0 else None

    def load_files(self, directory: Path, rank: int, same_world: bool) -> None:
        ds_dir = directory / DS_SUBDIR
        path, _ = self.ds.load_checkpoint(str(ds_dir), tag=DS_TAG, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"{ds_dir}: DeepSpeed found no checkpoint to load")
        if same_world:
            rng = safe_load(ds_dir / f"rng_rank{rank}.pt")
            torch.set_rng_state(rng["cpu"])
            if torch.cuda.is_available() and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])


def zero_state_bytes(numels: list[int], ranks: int, stage: int, param_bytes: int = 4) -> dict[str, int]:
    """What one rank holds after a step under ZeRO ``stage`` by DeepSpeed's partitioning rule, for
    parameter tensors of ``numels`` elements in one AdamW group: stages 1 / 2 flatten the group,
    pad it to a multiple of 2 x ranks and split it; stage 3 splits each tensor (rounded up). Besides
    the model's own weights (``param_bytes`` each, whole below stage 3) DeepSpeed keeps an fp32
    master copy of the partition, even when the weights are fp32 themselves; gradients: the reduced
    partition in the weights' dtype (at stage 1 also the whole gradients, until the boundary
    reduction frees them: the engine measures after it); AdamW's two fp32 moments plus one step
    counter."""
    total = sum(numels)
    if stage == 3:
        part = sum(-(-n // ranks) for n in numels)
    else:
        align = 2 * ranks
        part = -(-total // align) * align // ranks
    weights = part if stage == 3 else total
    # Stage 1 reduces at the accumulation boundary: the whole gradients live through the backward.
    grads = part * param_bytes + (total * param_bytes if stage == 1 else 0)
    return {"params": weights * param_bytes + 4 * part, "grads": grads, "optimizer": 8 * part + 4}
