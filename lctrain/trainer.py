"""The training loop: Llama training on packed long sequences, data and context parallel.

Order of set-up (parallelism is applied from outside the single-device model):
  1. process group and device                    (lctrain.distributed, in train.py)
  2. config checks that need the world size      (lctrain.config.validate)
  3. the strategy's set-up: groups, layout, attention slot, roles  (lctrain.attention.setup_attention)
  4. model on one device with that slot, optimizer / schedule, data, tracker  (lctrain.build, lctrain.optim)
  5. resume from a checkpoint if asked

``build_rank`` returns a ``Trainer`` on ranks that hold the model, and an ``AttentionServerRank``
on ranks a strategy keeps for serving attention only; both have ``fit()`` and ``close()``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm

from lctrain.attention import setup_attention
from lctrain.attention.strategies import AttentionSetup
from lctrain.batches import prepare_batch
from lctrain.build import build_data, build_model, training_dtypes
from lctrain.checkpoint import check_writable, find_step_dir, load_checkpoint, load_model_weights, save_checkpoint
from lctrain.checkpoint.identity import identity_fields
from lctrain.checkpoint.resume import find_resume_point
from lctrain.config import validate
from lctrain.data import ShardedLoader
from lctrain.data.sample import IGNORE_INDEX
from lctrain.distributed import DistEnv, all_ranks_flag, broadcast_string
from lctrain.distributed.watchdog import Heartbeat, is_timeout, set_timeout
from lctrain.engines import build_engine
from lctrain.evaluate import Evaluator
from lctrain.interop.hf import apply_hf_config, load_hf_weights
from lctrain.memory import check_fits
from lctrain.memory.measure import MemorySpan, held_bytes
from lctrain.models.loss import chunked_cross_entropy
from lctrain.optim import build_optimizer
from lctrain.preemption import StopRequests
from lctrain.tracking import Tracker

log = logging.getLogger("lctrain")
STOPPED_MARKER = "stopped.json"  # in the run directory after a stop on request; the SLURM script requeues on it


_NONFINITE_HINT = "Try a lower optim.lr, trainer.dtype=float32, or resume from the last checkpoint in {ckpt}"


class NonFiniteError(RuntimeError):
    """Raised on every rank, before the optimizer step, when any rank sees NaN/inf."""


class StalledRankError(RuntimeError):
    """A collective timed out: a peer rank stalled or died (named when its heartbeat says so)."""


def build_rank(cfg, env: DistEnv, run_dir) -> Trainer | AttentionServerRank:
    """What this rank runs: the trainer, or the attention-server loop of its strategy."""
    apply_hf_config(cfg)
    validate(cfg, env.world_size)
    setup = setup_attention(cfg, env)
    if setup.serve is not None:
        return AttentionServerRank(setup, env, cfg.trainer.stop_signals)
    return Trainer(cfg, env, run_dir, setup)


class AttentionServerRank:
    """A rank that holds no model: it serves attention until the workers finish."""

    holds_model = False
    step = 0

    def __init__(self, setup: AttentionSetup, env: DistEnv, stop_signals=()):
        self.setup, self.env = setup, env
        # A stop request reaches the workers too: they save, then release this rank.
        self.stops = StopRequests(stop_signals)

    def fit(self) -> Dict[str, Any]:
        start = time.perf_counter()
        calls = self.setup.serve()
        if self.env.is_main:
            tqdm.write(f"attention server rank {self.env.rank}: served {calls} calls")
        return {"final/train_loss": float("nan"), "final/served_calls": calls,
                "final/wall_s": time.perf_counter() - start}

    def save(self) -> None:
        """Nothing to save: servers keep no state."""

    def close(self) -> None:
        self.stops.restore()


class Trainer:
    holds_model = True

    def __init__(self, cfg, env: DistEnv, run_dir: Path, setup: AttentionSetup | None = None):
        self.cfg, self.env = cfg, env
        apply_hf_config(cfg)
        validate(cfg, env.world_size)
        self.setup = setup if setup is not None else setup_attention(cfg, env)
        if self.setup.serve is not None:
            raise ValueError(f"rank {env.rank} only serves attention; build it with lctrain.trainer.build_rank")
        # Before the model exists: a step that cannot fit stops here, naming the knobs that fit.
        self.memory_estimate, capacity = check_fits(cfg, self.setup.num_model_ranks, env.device, env.local_world_size,
                                                    distributed=dist.is_initialized())
        self._print(self.memory_estimate.summary() + (f" of {capacity / 2**30:.1f} GiB" if capacity else ""))
        self._memory_span = None
        self.attention, self.groups, self.layout = self.setup.attention, self.setup.groups, self.setup.layout
        self.model_group = self.setup.model_group  # gradient, loss, eval and checkpoint collectives
        self.dp_size, self.dp_rank = self.groups.dp_size, self.groups.dp_rank
        tc = cfg.trainer
        torch.set_num_threads(tc.num_threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
        # Every rank must agree on one run directory (Hydra evaluates it per process).
        self.run_dir = Path(broadcast_string(str(run_dir), env.device, group=self.model_group))
        self.ckpt_dir = Path(tc.checkpoint_dir) if tc.checkpoint_dir else self.run_dir / "checkpoints"
        self.run_id = self.run_dir.name  # a resume inherits the run id of its checkpoint
        self._check_checkpoint_dir()

        self.param_dtype, self.autocast_dtype = training_dtypes(tc.dtype, env.device)
        tokenizer, self.dataset = build_data(cfg.data)
        self.pad_id = tokenizer.pad_id
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model, self.attention,
                                 getattr(self.dataset, "vocab_size_needed", tokenizer.vocab_size), cfg.data.seq_len)
        self.model = self.model.to(self.param_dtype).to(env.device)
        # The engine holds the model state across the model group (replicated or sharded); the
        # optimizer is built on what it leaves on this rank.
        self.engine = build_engine(cfg, self.model, self.model_group, env.device, self.setup.num_model_ranks)
        if cfg.model.name == "hf":  # pretrained weights (each fsdp2 rank reads its rows); a resume or warm start
            load_hf_weights(cfg.model.path, self.model)  # replaces them. deepspeed partitions them at attach.
        if tc.memory_profile:  # measurement mode: what the engine holds now, then every allocation
            self._memory_held = held_bytes(self.model, self.engine.name == "ddp")
            self._memory_span = MemorySpan(env.device.type).__enter__()
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, tc.steps)
        self.loader = ShardedLoader(self.dataset, tc.micro_batch_size, self.dp_rank, self.dp_size, cfg.data.seed)
        self.step = 0
        self.tracker = Tracker(self.run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True),
                               enabled=env.is_main)
        point = self._start_point()
        # An engine may take over the optimizer here (deepspeed: after a warm start filled the weights).
        self.optimizer, self.scheduler = self.engine.attach(self.optimizer, self.scheduler)
        self.evaluate = Evaluator(self.model, self.dataset, cfg, self.setup, env.device, self._prepare,
                                  self._autocast, self.engine.call_eval)
        if point.path is not None:
            self._resume(point)
        self.stops = StopRequests(tc.stop_signals, tc.max_wall_s)
        self.heartbeat = Heartbeat(env.rank, env.world_size)

    # ----------------------------------------------------------------- set-up
    def _check_checkpoint_dir(self) -> None:
        """A checkpoint directory that cannot be written fails now, not at the first save."""
        def probe() -> str:
            try:
                check_writable(self.ckpt_dir)
                return ""
            except ValueError as err:
                return str(err)

        first = not torch.distributed.is_initialized() or torch.distributed.get_rank(self.model_group) == 0
        error = broadcast_string(probe() if first else "", self.env.device, group=self.model_group)
        if error:
            raise ValueError(error)

    def _start_point(self):
        """The checkpoint to resume (loaded later by ``_resume``), or a fresh start: then the warm
        start of ``trainer.init_from``, if any, fills the weights now."""
        point = find_resume_point(self.cfg, self.ckpt_dir, self.env.device, self.model_group)
        for warning in point.warnings:
            self._print(f"warning: {warning}", logging.WARNING)
        if point.path is None:
            if self.cfg.trainer.init_from:
                self._warm_start(self.cfg.trainer.init_from)
            self._print(f"starting from step 0 (checkpoints go to {self.ckpt_dir})")
        return point

    def _resume(self, point) -> None:
        meta = load_checkpoint(point.path, self.model, self.optimizer, self.scheduler, self.setup.num_model_ranks,
                               group=self.model_group, meta=point.meta, engine=self.engine)
        self.loader.load_state_dict(meta["data"])
        self.step, self.run_id = meta["step"], meta.get("run_id", self.run_id)
        self.tracker.rewind(self.step, str(point.path))
        changed = f" with changes {point.changes}" if point.changes else ""
        self._print(f"resumed run {self.run_id} from {point.path} at step {self.step}{changed}")

    def _warm_start(self, source: str) -> None:
        """Model weights from another run's checkpoint, verified, read collectively (each rank of a
        sharding engine reads its shards); optimizer, schedule and data start fresh."""
        step_dir = Path(broadcast_string(str(_or_error(find_step_dir, source)), self.env.device,
                                         group=self.model_group))
        if str(step_dir).startswith("error: "):
            raise ValueError(f"trainer.init_from={source}: {str(step_dir)[len('error: '):]}")
        try:
            load_model_weights(step_dir, self.model, group=self.model_group, collective=dist.is_initialized())
        except (Exception, CheckpointException) as err:  # DCP reports a shape mismatch in its own type
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if "mismatch" in ln), lines[0] if lines else repr(err))
            hint = " (the model config must match the checkpoint's)" if "mismatch" in reason else ""
            raise ValueError(f"trainer.init_from={source}: {reason}{hint}") from None
        self._print(f"initialised the model from {step_dir} (optimizer and data start fresh)")

    def _print(self, msg: str, level: int = logging.INFO) -> None:
        """Every rank's log file; the console of rank 0."""
        log.log(level, msg)
        if self.env.is_main:
            tqdm.write(msg)

    def _prepare(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return prepare_batch(batch, self.layout, self.groups.cp_rank, self.pad_id, self.env.device)

    def _autocast(self):
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(x, group=self.model_group)
        return x

    # ------------------------------------------------------------------- loss
    def loss_sum(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of per-token cross-entropies of one micro batch (weighted answers)."""
        with self._autocast():
            return self.engine.call(self._loss_sum, batch)

    def _loss_sum(self, forward, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The forward and the loss on its hidden states (inside the engine's forward: ZeRO-3
        gathers the output weight the loss reads)."""
        hidden = forward(batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch["token_pos"])
        total = chunked_cross_entropy(hidden, self.model.output_weight, batch["labels"],
                                      self.cfg.model.loss_chunk_tokens)
        extra = self.cfg.data.answer_loss_weight - 1.0
        if extra and bool(batch["answer_mask"].any()):
            logits = self.model.logits_at(hidden, batch["answer_mask"])
            total = total + extra * torch.nn.functional.cross_entropy(
                logits, batch["labels"][batch["answer_mask"]], reduction="sum")
        return total

    def _global_token_count(self, batches) -> torch.Tensor:
        count = sum((bt["labels"] != IGNORE_INDEX).sum() for bt in batches).to(torch.float64)
        return self._all_reduce(count).clamp_min(1)

    # ------------------------------------------------------------------- step
    def train_step(self) -> float:
        self.model.train()
        batches = [self._prepare(next(self.loader)) for _ in range(self.cfg.trainer.grad_accum)]
        # Normalise by the token count of the whole global batch, so the summed
        # gradients across ranks are exactly those of the global mean loss.
        denom = self._global_token_count(batches)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for i, batch in enumerate(batches):
            self.attention.begin_step()  # the strategy's once-per-micro-batch checks (shard shapes)
            with self.engine.accumulate(last=i == len(batches) - 1):  # the engine reduces on the last
                loss = self.loss_sum(batch) / denom.to(torch.float32 if self.param_dtype != torch.float64
                                                       else torch.float64)
                self.engine.backward(loss)
            loss_total += loss.detach().to(torch.float64)
        if self.cfg.trainer.nan_check:
            self._check_finite(loss_total, self.engine.local_grads())
        grad_norm = self.engine.optimizer_step(self.optimizer, self.scheduler, self.cfg.optim.grad_clip)
        if self.cfg.trainer.nan_check and self.engine.skips_nonfinite and not math.isfinite(grad_norm):
            # deepspeed checks the gradients inside its step, and skipped this one on every rank
            raise NonFiniteError(f"non-finite gradient norm at step {self.step + 1}; the optimizer step was skipped "
                                 f"on every rank. {_NONFINITE_HINT.format(ckpt=self.ckpt_dir)}")
        self.step += 1
        self._all_reduce(loss_total)
        self._last_grad_norm = float(grad_norm)
        return float(loss_total)

    def _check_finite(self, loss: torch.Tensor, grads) -> None:
        # The engine has already reduced the gradients (during the backward), so one rank's NaN is
        # everyone's by now: the ranks whose own loss is non-finite are the ones to name.
        loss_bad = all_ranks_flag(not bool(torch.isfinite(loss)), self.env.device, self.model_group)
        grad_norms = torch.stack([g.float().norm() for g in grads]) if grads else torch.zeros(1)
        grads_bad = all_ranks_flag(not bool(torch.isfinite(grad_norms).all()), self.env.device, self.model_group)
        bad = loss_bad or grads_bad
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"non-finite loss or gradient at step {self.step + 1} on rank(s) {bad}; stopped every rank "
                f"before the optimizer step. {_NONFINITE_HINT.format(ckpt=self.ckpt_dir)}")

    # ------------------------------------------------------------------- loop
    def _guarded_step(self) -> float:
        """``train_step``; a collective timeout becomes a StalledRankError naming the quiet ranks."""
        try:
            return self.train_step()
        except RuntimeError as err:
            if not is_timeout(err) or isinstance(err, NonFiniteError):
                raise
            quiet = self.heartbeat.stalled()
            who = ("rank(s) " + ", ".join(f"{r} (silent for {age:.0f}s, last heartbeat at step {s})"
                                          for r, (age, s) in sorted(quiet.items()))
                   if quiet else "a peer rank (no heartbeat could name it)")
            raise StalledRankError(
                f"rank {self.env.rank}: a collective timed out during step {self.step + 1}; {who} stopped "
                f"answering. trainer.comm_timeout_s={self.cfg.trainer.comm_timeout_s:g} bounds the wait; "
                f"the last checkpoint is in {self.ckpt_dir}") from err

    def _stop_now(self, reason: str) -> Dict[str, Any]:
        """Every rank, after a step: save it, release attention servers, leave the marker."""
        saved = getattr(self, "_saved", None)
        path = saved if saved is not None and saved.name == f"step_{self.step:08d}" else self.save()
        self.attention.finish()
        if self.env.is_main:
            (self.run_dir / STOPPED_MARKER).write_text(json.dumps({"step": self.step, "reason": reason,
                                                                   "checkpoint": str(path)}))
        if self.env.is_main:
            self._draw_curves()
        self._print(f"stopped at step {self.step} ({reason}); saved {path}; rerun to resume "
                    f"(trainer.resume=auto is the default)")
        return {"final/train_loss": float("nan"), "final/stopped": reason, "final/steps_run": self.step,
                "final/checkpoint": str(path)}

    def fit(self) -> Dict[str, Any]:
        tc = self.cfg.trainer
        tokens_per_step = self.dp_size * tc.micro_batch_size * tc.grad_accum * self.cfg.data.seq_len
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (self.env.is_main and tc.progress),
                   desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
        start = time.perf_counter()
        start_step = self.step
        metrics: Dict[str, Any] = {}
        try:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                if self._memory_span is not None:
                    with self._memory_span.phase(f"step {self.step + 1}"):
                        loss = self._guarded_step()
                else:
                    loss = self._guarded_step()
                dt = time.perf_counter() - t0
                if self._memory_span is not None and self.step >= min(start_step + 2, tc.steps):
                    self._report_memory_profile()
                if self.step == start_step + 1:
                    self._report_state_bytes()  # gradients and optimizer state exist from the first step on
                    if torch.distributed.is_initialized():
                        # Set-up and the first step may take long; from now on a stall fails fast.
                        set_timeout(tc.comm_timeout_s, self._groups_to_time())
                self.heartbeat.step = self.step
                metrics = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                           "train/grad_norm": self._last_grad_norm, "train/tokens_per_s": tokens_per_step / dt,
                           "train/step_time_s": dt, **self.attention.step_metrics()}
                if self.env.device.type == "cuda":  # the allocator's own counter: no device sync
                    metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
                else:  # this process's peak resident set (KiB on Linux): one syscall
                    metrics["train/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                if self.step % self.cfg.logger.log_every == 0 or self.step == tc.steps:
                    self.tracker.log(metrics, self.step)
                    peak = metrics.get("train/peak_mem_gib", metrics.get("train/peak_rss_gib"))
                    log.info("step %d loss %.4f lr %.3g grad_norm %.3g %.0f tok/s peak %.3f GiB", self.step, loss,
                             metrics["train/lr"], self._last_grad_norm, tokens_per_step / dt, peak)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
                bar.update(1)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    ev = self.evaluate()
                    self.tracker.log(ev, self.step)
                    self._print(f"step {self.step}: " + _fmt(ev))
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self._saved = self.save()
                reason = self.stops.agreed(self.env.device, self.model_group)
                if reason:
                    bar.close()
                    return self._stop_now(reason)
        finally:
            bar.close()
        if tc.save_final and (not tc.checkpoint_every or self.step % tc.checkpoint_every):
            self.save()
        final = self.evaluate()
        self.attention.finish()  # the last attention call is done: release attention servers
        wall = time.perf_counter() - start
        summary = {"final/train_loss": metrics.get("train/loss", float("nan")), **final,
                   "final/wall_s": wall, "final/steps_run": self.step - start_step}
        self.tracker.log(final, self.step)
        self.tracker.summary(summary)
        if self.env.is_main:
            (self.run_dir / STOPPED_MARKER).unlink(missing_ok=True)
            self._draw_curves()
        self._print(_final_line(summary, getattr(self.dataset, "describe", None)))
        return summary

    def _report_state_bytes(self) -> None:
        """Bytes of parameters, gradients and optimizer state each model rank holds (its shards), in
        the log and in ``state_bytes.json`` of the run directory."""
        keys = ("params", "grads", "optimizer")
        mine = self.engine.measured
        n = self.setup.num_model_ranks
        table = torch.zeros(n, len(keys), dtype=torch.float64, device=self.env.device)
        rank = dist.get_rank(self.model_group) if dist.is_initialized() else 0
        table[rank] = torch.tensor([float(mine[k]) for k in keys], dtype=torch.float64)
        self._all_reduce(table)
        per_rank = [{k: int(v) for k, v in zip(keys, row.tolist())} for row in table.cpu()]
        if self.env.is_main:
            (self.run_dir / "state_bytes.json").write_text(json.dumps(
                {"engine": self.engine.name, "ranks": per_rank}, indent=1))
        worst = max(per_rank, key=lambda r: sum(r.values()))
        self._print(f"engine {self.engine.name}: model state per rank up to "
                    + ", ".join(f"{k} {worst[k] / 2**20:.2f} MiB" for k in keys)
                    + f" ({n} model ranks; {self.run_dir / 'state_bytes.json'})")

    def _report_memory_profile(self) -> None:
        """Close the measurement span (set-up and the first two steps) and write this rank's measured
        peak next to the estimate in ``memory_rank<r>.json``."""
        span, self._memory_span = self._memory_span, None
        span.__exit__(None, None, None)
        est = self.memory_estimate
        held = self._memory_held
        steps = {name: held + span.peak_in(name) for name in span.phase_names()}
        peak = held + span.peak_bytes
        record = {"rank": self.env.rank, "measured_peak_bytes": peak, "held_before_bytes": held, "step_peaks": steps,
                  "estimate": est.as_dict(), "ratio": est.peak / max(peak, 1)}
        (self.run_dir / f"memory_rank{self.env.rank}.json").write_text(json.dumps(record, indent=1))
        log.info("memory: measured peak %.1f MiB, estimated %.1f MiB (ratio %.3f)", peak / 2**20,
                 est.peak / 2**20, record["ratio"])

    def _draw_curves(self) -> None:
        """Rank 0: the run's curves next to its metrics (``lctrain-plot RUN_DIR`` redraws them)."""
        from lctrain.plot import plot_run

        self.tracker.flush()
        log.info(f"wrote {plot_run(self.run_dir)}")

    def _groups_to_time(self) -> list:
        g = self.groups
        return [self.model_group, g.cp_group, g.ulysses_group, g.ring_group]

    def save(self) -> Path:
        """Every rank holding model state calls this (over the strategy's model group)."""
        run = {"run_id": self.run_id, "identity": identity_fields(self.cfg),
               "config": OmegaConf.to_container(self.cfg, resolve=True)}
        path = save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
                               self.loader.state_dict(), self.setup.num_model_ranks,
                               self.cfg.trainer.keep_checkpoints, group=self.model_group, run=run,
                               engine=self.engine)
        log.info(f"saved {path}")
        return path

    def close(self) -> None:
        if self._memory_span is not None:  # a run that ended before its second step: nothing to report
            self._memory_span.__exit__(None, None, None)
            self._memory_span = None
        self.stops.restore()
        self.heartbeat.close()
        self.tracker.close()


def _fmt(metrics: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _final_line(s: Dict[str, Any], describe=None) -> str:
    line = f"final train loss {s['final/train_loss']:.4f} | eval loss {s['eval/loss']:.4f}"
    if "eval/answer_acc" in s and describe is not None:
        line += f" | {describe(s['eval/answer_acc'])} | exact answers {100 * s['eval/answer_exact']:.1f}%"
    return line + f" | {s['final/steps_run']} steps in {s['final/wall_s']:.0f}s"


def _or_error(fn, *args) -> str:
    """``str(fn(*args))``, or ``"error: <message>"`` when it raises a ValueError."""
    try:
        return str(fn(*args))
    except ValueError as err:
        return f"error: {err}"
