"""Evaluation on held-out samples: teacher-forced loss and answer accuracy, and (optionally)
the answers decoded greedily with the KV cache sharded over the cp ranks.

Every rank of the job runs the same eval batches (collectives line up); a sample's tokens may
sit on several cp ranks, so per-sample counts are summed over the cp group before they are
judged, and totals over the ranks holding model state.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.distributed as dist

from lctrain.data import eval_batches
from lctrain.data.sample import IGNORE_INDEX
from lctrain.models.loss import chunked_cross_entropy


class Evaluator:
    """``evaluate()`` of the trainer; built once from the pieces the trainer holds."""

    def __init__(self, model, dataset, cfg, setup, device: torch.device, prepare: Callable, autocast: Callable,
                 call: Callable | None = None):
        self.model, self.dataset, self.cfg, self.setup = model, dataset, cfg, setup
        self.device, self.prepare, self.autocast = device, prepare, autocast
        # call(fn, *args) runs fn(forward, *args) as one forward of the engine (ZeRO-3 gathers inside)
        self.call = call if call is not None else (lambda fn, *args: fn(self.model, *args))
        self.groups = setup.groups
        self.distributed = dist.is_initialized()

    def _all_reduce(self, x: torch.Tensor, group) -> None:
        """Sum over ``group`` (None: the world) in a job; nothing when this process runs alone."""
        if self.distributed:
            dist.all_reduce(x, group=group)

    @torch.no_grad()
    def __call__(self) -> Dict[str, float]:
        """Eval loss and teacher-forced answer accuracy over the eval samples; a sample counts
        as exactly right when every answer token is the argmax (what greedy decoding gives)."""
        self.model.eval()
        tc, groups = self.cfg.trainer, self.groups
        per_step = groups.dp_size * tc.micro_batch_size
        num = max(1, tc.eval_samples // per_step) * per_step
        stats = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, tokens, right, answers, exact
        for batch in eval_batches(self.dataset, num, tc.micro_batch_size, groups.dp_rank, groups.dp_size):
            batch = self.prepare(batch)
            self.setup.attention.begin_step()
            with self.autocast():
                loss, per_row = self.call(self._loss_and_answers, batch)
            stats[0] += loss.double()
            stats[1] += (batch["labels"] != IGNORE_INDEX).sum()
            if groups.cp_group is not None:  # a sample's answers may sit on several cp ranks
                self._all_reduce(per_row, groups.cp_group)
            has_answer = per_row[:, 0] > 0
            stats[3] += per_row[:, 0].sum() / groups.cp_size
            stats[2] += per_row[:, 1].sum() / groups.cp_size
            stats[4] += (has_answer & (per_row[:, 0] == per_row[:, 1])).sum().double() / groups.cp_size
        self._all_reduce(stats, self.setup.model_group)
        out = {"eval/loss": float(stats[0] / stats[1].clamp_min(1))}
        if stats[3] > 0:
            out["eval/answer_acc"] = float(stats[2] / stats[3])
            if hasattr(self.dataset, "chance"):
                out["eval/answer_chance"] = self.dataset.chance
            out["eval/answer_exact"] = float(stats[4] / num)
        if tc.decode_eval != "none":
            out.update(self.decode(tc.decode_eval, tc.decode_eval_samples))
        return out

    def _loss_and_answers(self, forward, batch):
        hidden = forward(batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch["token_pos"])
        loss = chunked_cross_entropy(hidden, self.model.output_weight, batch["labels"],
                                     self.cfg.model.loss_chunk_tokens)
        return loss, self._answers(hidden, batch)

    def _answers(self, hidden: torch.Tensor, batch) -> torch.Tensor:
        """Per sample (answer tokens, right ones) on this rank: (b, 2) float64."""
        mask = batch["answer_mask"]
        per_row = torch.zeros(mask.shape[0], 2, dtype=torch.float64, device=self.device)
        for row in range(mask.shape[0]):
            if mask[row].any():
                pred = self.model.logits_at(hidden[row:row + 1], mask[row:row + 1]).argmax(-1)
                per_row[row, 0] = mask[row].sum()
                per_row[row, 1] = (pred == batch["labels"][row][mask[row]]).sum()
        return per_row

    def decode(self, combine: str, num_samples: int) -> Dict[str, float]:
        """Passkey answers decoded greedily with the KV cache sharded over the cp group."""
        from lctrain.decode.passkey import passkey_decode_eval

        groups, layout = self.groups, self.setup.layout
        with torch.no_grad(), self.autocast():
            result = passkey_decode_eval(
                self.model, self.dataset, num_samples, cp_group=groups.cp_group,
                layout=layout if layout is not None else "striped", decode=combine,
                prefill_strategy=self.cfg.cp.strategy, dp_rank=groups.dp_rank, dp_size=groups.dp_size,
                kernel=self.cfg.kernel.name)
        # Every cp rank of a group reports its group's counts: sum over workers, divide by cp.
        counts = torch.tensor([result[k] for k in ("num_samples", "num_exact", "num_digits", "num_right")],
                              dtype=torch.float64, device=self.device)
        self._all_reduce(counts, self.setup.model_group)
        samples, exact, digits, right = (counts / groups.cp_size).tolist()
        return {"eval/decode_exact": exact / max(samples, 1), "eval/decode_digit_acc": right / max(digits, 1)}
