"""The training loop: data-parallel Llama training on packed long sequences.

Order of set-up (parallelism is applied from outside the single-device model):
  1. process group and device            (lctrain.distributed)
  2. config checks that need world size  (lctrain.config.validate)
  3. model on one device, attention slot filled by build_attention(cfg)
  4. optimizer / schedule, data loader, tracker
  5. resume from a checkpoint if asked
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from lctrain.attention import build_attention, get_layout
from lctrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lctrain.config import validate
from lctrain.data import ShardedLoader, build_dataset, build_tokenizer, eval_batches
from lctrain.distributed import DistEnv, all_ranks_flag, broadcast_string, reduce_gradients
from lctrain.distributed.groups import ParallelGroups, build_parallel_groups
from lctrain.models.llama import Llama, LlamaShape, chunked_cross_entropy
from lctrain.tracking import Tracker

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Raised on every rank, before the optimizer step, when any rank sees NaN/inf."""


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def build_model(cfg, vocab_size_needed: int, layout=None, groups=None, attention=None) -> Llama:
    m = cfg.model
    if m.vocab_size < vocab_size_needed:
        raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size_needed}; set model.vocab_size={vocab_size_needed} or larger")
    shape = LlamaShape(vocab_size=m.vocab_size, dim=m.dim, num_layers=m.num_layers, num_heads=m.num_heads,
                       num_kv_heads=m.num_kv_heads, ffn_dim=m.ffn_dim, rope_theta=m.rope_theta,
                       norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings, init_std=m.init_std)
    cp_group, subgroups = (groups.cp_group, groups.usp_groups) if groups is not None else (None, None)
    attention = attention or build_attention(strategy=cfg.cp.strategy, layout=layout, group=cp_group, kernel=cfg.kernel.name,
                                check_shapes=cfg.cp.check_shapes, subgroups=subgroups,
                                query_chunk=cfg.cp.query_chunk or None)
    return Llama(shape, attention, activation_checkpointing=m.activation_checkpointing)


class Trainer:
    def __init__(self, cfg, env: DistEnv, run_dir: Path):
        self.cfg = cfg
        self.env = env
        self.dp_size = validate(cfg, env.world_size)
        self.disagg, self.worker_group = self._build_disagg()
        self.is_attention_server = self.disagg is not None and not self.disagg.runtime.is_worker
        # Ranks holding model state: checkpoints are saved and loaded over these only.
        self.num_workers = self.disagg.runtime.num_workers if self.disagg is not None else env.world_size
        if self.disagg is not None:  # workers are data parallel with whole sequences: no cp group
            self.groups = ParallelGroups(self.dp_size, 1, 0 if self.is_attention_server else env.rank, 0, None)
        else:
            self.groups = build_parallel_groups(env.rank, env.world_size, self.dp_size, cfg.cp.size,
                                                cfg.cp.ulysses_size if cfg.cp.strategy == "usp" else None)
        self.dp_rank = self.groups.dp_rank
        # Ranks of one cp group share each sequence; the layout deals its tokens.
        self.layout = get_layout(cfg.cp.layout, cfg.cp.size) if cfg.cp.strategy not in ("none", "disagg") else None
        tc = cfg.trainer
        threads = tc.num_threads or max(1, (os.cpu_count() or 1) // env.local_world_size)
        torch.set_num_threads(threads)
        # Every rank must agree on one run directory (Hydra evaluates it per process).
        self.run_dir = Path(broadcast_string(str(run_dir), env.device))
        self.ckpt_dir = Path(tc.checkpoint_dir) if tc.checkpoint_dir else self.run_dir / "checkpoints"

        self.param_dtype, self.autocast_dtype = self._dtypes(tc.dtype)
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.pad_id = tokenizer.pad_id
        self.model = build_model(cfg, tokenizer.vocab_size, self.layout, self.groups, self.disagg)
        self.model = self.model.to(self.param_dtype).to(env.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.optim.warmup_steps, tc.steps, cfg.optim.min_lr_ratio))
        self.dataset = build_dataset(cfg.data.name, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                                     tokenizer=tokenizer, **_dataset_kwargs(cfg.data))
        self.loader = ShardedLoader(self.dataset, tc.micro_batch_size, self.dp_rank, self.dp_size, cfg.data.seed)
        self.step = 0
        self.history: List[float] = []
        self.tracker = Tracker(self.run_dir, cfg.logger,
                               OmegaConf.to_container(cfg, resolve=True), enabled=env.is_main)
        self._maybe_resume()

    # ----------------------------------------------------------------- set-up
    def _build_disagg(self):
        """cp=disagg: the attention servers, and (dedicated) the group of worker ranks that
        gradient, loss and eval collectives use, since server ranks never join those."""
        if self.cfg.cp.strategy != "disagg":
            return None, None
        from lctrain.disagg.attention import build_disagg_attention

        d = self.cfg.disagg
        worker_group = None
        if d.mode == "dedicated" and self.env.backend is not None:
            worker_group = torch.distributed.new_group(list(range(self.env.world_size - d.num_servers)))
        attention = build_disagg_attention(d.mode, d.num_servers if d.mode == "dedicated" else None,
                                           chunk_tokens=d.chunk_tokens or None, timeout_s=d.timeout_s,
                                           max_docs=d.max_docs)
        return attention, worker_group

    def _dtypes(self, name: str):
        on_cuda = self.env.device.type == "cuda"
        if name == "auto":
            return torch.float32, (torch.bfloat16 if on_cuda else None)
        if name == "bfloat16":  # fp32 master weights, bf16 compute
            return torch.float32, torch.bfloat16
        return _DTYPES[name], None

    def _maybe_resume(self) -> None:
        resume = self.cfg.trainer.resume
        if resume == "none" or self.is_attention_server:  # servers hold no state to restore
            return
        path = latest_checkpoint(self.ckpt_dir) if resume == "auto" else Path(resume)
        if path is None:
            self._print(f"trainer.resume=auto: no checkpoint in {self.ckpt_dir}, starting from step 0")
            return
        meta = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.num_workers,
                               group=self.worker_group)
        self.loader.load_state_dict(meta["data"])
        self.step = meta["step"]
        self._print(f"resumed from {path} at step {self.step}")

    def _print(self, msg: str) -> None:
        if self.env.is_main:
            tqdm.write(msg)

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Add global token positions, and with cp keep only this rank's shard."""
        b, s = batch["input_ids"].shape
        batch = {**batch, "token_pos": torch.arange(s).expand(b, s)}
        if self.layout is not None:
            batch = {k: self.layout.shard(_pad_to(v, self.layout.multiple, k, self.pad_id),
                                          self.groups.cp_rank, dim=1)
                     for k, v in batch.items()}
        return {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    # ------------------------------------------------------------------- loss
    def loss_sum(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of per-token cross-entropies of one micro batch (weighted answers)."""
        with self._autocast():
            hidden = self._hidden(batch)
            total = chunked_cross_entropy(hidden, self.model.output_weight, batch["labels"],
                                          self.cfg.model.loss_chunk_tokens)
            extra = self.cfg.data.answer_loss_weight - 1.0
            if extra and bool(batch["answer_mask"].any()):
                logits = self.model.logits_at(hidden, batch["answer_mask"])
                total = total + extra * F.cross_entropy(
                    logits, batch["labels"][batch["answer_mask"]], reduction="sum")
        return total

    def _hidden(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        args = (batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch["token_pos"])
        if self.disagg is not None and self.cfg.disagg.ping_pong:
            from lctrain.disagg.pingpong import pingpong_forward

            return pingpong_forward(self.model, self.disagg, *args)
        return self.model(*args)

    def _global_token_count(self, batches) -> torch.Tensor:
        count = sum((bt["labels"] != -100).sum() for bt in batches).to(torch.float64)
        if self.env.backend is not None:
            torch.distributed.all_reduce(count, group=self.worker_group)
        return count.clamp_min(1)

    # ------------------------------------------------------------------- step
    def train_step(self) -> float:
        self.model.train()
        batches = [self._to_device(next(self.loader)) for _ in range(self.cfg.trainer.grad_accum)]
        # Normalise by the token count of the whole global batch, so the summed
        # gradients across ranks are exactly those of the global mean loss.
        denom = self._global_token_count(batches)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for batch in batches:
            loss = self.loss_sum(batch) / denom.to(torch.float32 if self.param_dtype != torch.float64 else torch.float64)
            loss.backward()
            loss_total += loss.detach().to(torch.float64)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.trainer.nan_check:
            self._check_finite(loss_total, params)
        reduce_gradients(params, group=self.worker_group)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.env.backend is not None:
            torch.distributed.all_reduce(loss_total, group=self.worker_group)
        self._last_grad_norm = float(grad_norm)
        return float(loss_total)

    def _check_finite(self, loss: torch.Tensor, params) -> None:
        local = torch.stack([loss.float()] + [p.grad.float().norm() for p in params])
        bad = all_ranks_flag(not bool(torch.isfinite(local).all()), self.env.device, self.worker_group)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"non-finite loss or gradient at step {self.step + 1} on rank(s) {bad}; stopped every rank "
                f"before the optimizer step. Try a lower optim.lr, trainer.dtype=float32, or resume from "
                f"the last checkpoint in {self.ckpt_dir}")

    # ------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Eval loss and (passkey) teacher-forced answer accuracy over eval samples.

        A sample counts as exactly right when every answer digit is the argmax:
        that is what greedy decoding would produce for it.
        """
        self.model.eval()
        tc = self.cfg.trainer
        num = max(1, tc.eval_samples // (self.dp_size * tc.micro_batch_size)) * self.dp_size * tc.micro_batch_size
        stats = torch.zeros(5, dtype=torch.float64, device=self.env.device)  # loss, tokens, right, digits, exact
        for batch in eval_batches(self.dataset, num, tc.micro_batch_size, self.dp_rank, self.dp_size):
            batch = self._to_device(batch)
            b = batch["input_ids"].shape[0]
            with self._autocast():
                hidden = self._hidden(batch)
                stats[0] += chunked_cross_entropy(hidden, self.model.output_weight, batch["labels"],
                                                  self.cfg.model.loss_chunk_tokens).double()
            stats[1] += (batch["labels"] != -100).sum()
            mask = batch["answer_mask"]
            # Per sample: answer digits and right ones; summed over the cp group,
            # since a sample's digits may sit on several ranks.
            per_row = torch.zeros(b, 2, dtype=torch.float64, device=self.env.device)
            for row in range(b):
                if mask[row].any():
                    pred = self.model.logits_at(hidden[row:row + 1], mask[row:row + 1]).argmax(-1)
                    per_row[row, 0] = mask[row].sum()
                    per_row[row, 1] = (pred == batch["labels"][row][mask[row]]).sum()
            if self.groups.cp_group is not None:
                torch.distributed.all_reduce(per_row, group=self.groups.cp_group)
            has_answer = per_row[:, 0] > 0
            stats[3] += per_row[:, 0].sum() / self.groups.cp_size
            stats[2] += per_row[:, 1].sum() / self.groups.cp_size
            stats[4] += (has_answer & (per_row[:, 0] == per_row[:, 1])).sum().double() / self.groups.cp_size
        if self.env.backend is not None:
            torch.distributed.all_reduce(stats, group=self.worker_group)
        out = {"eval/loss": float(stats[0] / stats[1].clamp_min(1))}
        if stats[3] > 0:
            out["eval/answer_digit_acc"] = float(stats[2] / stats[3])
            out["eval/answer_exact"] = float(stats[4] / num)
        if tc.decode_eval != "none":
            out.update(self._decode_eval(tc.decode_eval, tc.decode_eval_samples))
        return out

    def _decode_eval(self, decode: str, num_samples: int) -> Dict[str, float]:
        """Passkey answers decoded greedily with the KV cache sharded over the cp group."""
        from lctrain.generate_eval import passkey_decode_eval

        strategy = self.cfg.cp.strategy
        with torch.no_grad(), self._autocast():
            result = passkey_decode_eval(
                self.model, self.dataset, num_samples, cp_group=self.groups.cp_group,
                layout=self.layout if self.layout is not None else "striped", decode=decode,
                prefill_strategy=strategy, dp_rank=self.dp_rank, dp_size=self.dp_size)
        # Every cp rank of a group reports its group's counts: sum over workers, divide by cp.
        counts = torch.tensor([result[k] for k in ("num_samples", "num_exact", "num_digits", "num_right")],
                              dtype=torch.float64, device=self.env.device)
        if self.env.backend is not None:
            torch.distributed.all_reduce(counts, group=self.worker_group)
        samples, exact, digits, right = (counts / self.groups.cp_size).tolist()
        return {"eval/decode_exact": exact / max(samples, 1), "eval/decode_digit_acc": right / max(digits, 1)}

    # ------------------------------------------------------------------- loop
    def fit(self) -> Dict[str, Any]:
        if self.is_attention_server:
            return self.serve_attention()
        summary = self._fit()
        self.stop_attention_servers()
        return summary

    def serve_attention(self) -> Dict[str, Any]:
        """Dedicated server ranks: answer the workers' attention calls until they finish."""
        from lctrain.disagg.attention import serve

        start = time.perf_counter()
        calls = serve(self.disagg)
        self._print(f"attention server rank {self.env.rank}: served {calls} calls")
        return {"final/train_loss": float("nan"), "final/served_calls": calls,
                "final/wall_s": time.perf_counter() - start}

    def stop_attention_servers(self) -> None:
        """Workers, after their last attention call: release the dedicated servers' loop."""
        if self.disagg is not None:
            self.disagg.stop()

    def _fit(self) -> Dict[str, Any]:
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
                loss = self.train_step()
                dt = time.perf_counter() - t0
                self.history.append(loss)
                metrics = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                           "train/grad_norm": self._last_grad_norm, "train/tokens_per_s": tokens_per_step / dt,
                           "train/step_time_s": dt}
                if self.disagg is not None:  # the plan's predicted balance vs no servers
                    metrics.update(self.disagg.runtime.plan_stats())
                if self.step % self.cfg.logger.log_every == 0 or self.step == tc.steps:
                    self.tracker.log(metrics, self.step)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
                bar.update(1)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    ev = self.evaluate()
                    self.tracker.log(ev, self.step)
                    self._print(f"step {self.step}: " + _fmt(ev))
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
        if tc.save_final and (not tc.checkpoint_every or self.step % tc.checkpoint_every):
            self.save()
        final = self.evaluate()
        wall = time.perf_counter() - start
        summary = {"final/train_loss": metrics.get("train/loss", float("nan")), **final,
                   "final/wall_s": wall, "final/steps_run": self.step - start_step}
        self.tracker.log(final, self.step)
        self.tracker.summary(summary)
        self._print(_final_line(summary))
        return summary

    def save(self) -> Path | None:
        """Workers only (every one of them): dedicated attention servers hold no model state."""
        if self.is_attention_server:
            return None
        return save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
                               self.loader.state_dict(), self.num_workers, self.cfg.trainer.keep_checkpoints,
                               group=self.worker_group)

    def close(self) -> None:
        self.tracker.close()


_PAD_VALUES = {"labels": -100, "doc_ids": -1, "position_ids": 0, "answer_mask": False}


def _pad_to(x: torch.Tensor, multiple: int, key: str, pad_id: int) -> torch.Tensor:
    """Pad (b, s) to a multiple of the layout's: padding is its own masked
    document (doc -1), excluded from the loss, with positions continuing."""
    extra = -x.shape[1] % multiple
    if not extra:
        return x
    if key == "token_pos":
        tail = torch.arange(x.shape[1], x.shape[1] + extra).expand(x.shape[0], extra)
    else:
        tail = torch.full((x.shape[0], extra), _PAD_VALUES.get(key, pad_id), dtype=x.dtype)
    return torch.cat([x, tail], dim=1)


def _dataset_kwargs(data) -> Dict[str, Any]:
    if data.name == "passkey":
        return {"docs_per_seq": data.docs_per_seq, "num_needles": data.num_needles, "key_digits": data.key_digits}
    return {"path": data.path, "text_key": data.jsonl_key}


def _fmt(metrics: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _final_line(s: Dict[str, Any]) -> str:
    line = f"final train loss {s['final/train_loss']:.4f} | eval loss {s['eval/loss']:.4f}"
    if "eval/answer_digit_acc" in s:
        line += (f" | passkey digit accuracy {100 * s['eval/answer_digit_acc']:.1f}% (chance 10.0%)"
                 f" | exact keys {100 * s['eval/answer_exact']:.1f}%")
    return line + f" | {s['final/steps_run']} steps in {s['final/wall_s']:.0f}s"
