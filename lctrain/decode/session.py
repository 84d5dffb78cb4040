"""Distributed greedy decoding with the KV cache sharded along the sequence.

    from lctrain.decode import generate, single_device_generate
    new_ids = generate(model, prompt_ids, max_new_tokens=64, cp_group=group,
                       layout="striped", prefill_strategy="tree", decode="tree")

Every rank of the context-parallel group passes the same (replicated) prompt.

1. Prefill: the prompt is padded to the layout's multiple (padding is doc -1)
   and dealt by the layout; the model's own forward runs on this rank's shard
   with every layer's attention slot holding ``build_attention(
   prefill_strategy, layout, group)`` behind a capturing wrapper that stores
   the post-RoPE K/V of the local tokens into a ``ShardedKVCache``
   (``cache``). The rank holding the last prompt token
   computes the first new token and broadcasts it.
2. Decode, per token: the token id is replicated on every rank, so the model's
   forward (embedding, norms, projections, RoPE, MLP: the Llama module's own
   code, untouched) runs on the one new token everywhere; each layer's slot
   appends the new K/V to the emptiest rank's cache (see ``cache``),
   computes the partial attention of the query against the local shard
   (``blockwise_forward`` with global coordinates) and combines the partials
   exactly: ``decode="tree"`` with two all-reduces (MAX of lse, then SUM of the
   rescaled numerator and denominator), ``decode="ring"`` with P - 1 sequential
   merges along the ring plus a broadcast, ``decode="butterfly"`` with log2 P
   P2P swap-and-merge rounds (``combine``). The
   argmax is broadcast from group rank 0 (one 8-byte collective per token) so
   every rank continues with the same token by construction.

Greedy, batch 1; the model is put in eval mode and run under ``no_grad``; its
attention slots are restored afterwards. The decoded tokens continue the
prompt's last document (the in-document position of the last prompt token + 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lctrain.attention import build_attention, get_layout
from lctrain_kernels.mask import PAD_DOC

from .cache import ShardedKVCache, prompt_keep_masks
from .combine import COMBINES, DecodeCounters, decode_comm, local_partial


class _PrefillSlot:
    """The prefill strategy, capturing this layer's post-RoPE local K/V on the way."""

    def __init__(self, attn, cache: ShardedKVCache, layer: int):
        self.attn, self.cache, self.layer = attn, cache, layer

    def __call__(self, q, k, v, coords, mask):
        self.cache.store_prefill(self.layer, k, v)
        return self.attn(q, k, v, coords, mask)


class _DecodeSlot:
    """One new query: append its K/V on the owner, partial vs local cache, exact combine."""

    def __init__(self, session: "DecodeSession", layer: int):
        self.session, self.layer = session, layer

    def __call__(self, q, k, v, coords, mask):
        s = self.session
        s.cache.append(self.layer, k, v)
        k_cache, v_cache, k_coords = s.cache.view(self.layer)
        out, lse = local_partial(q, k_cache, v_cache, coords, k_coords, mask, s.comm)
        out, _ = s.combine(out, lse)
        return out.to(q.dtype)


class DecodeSession:
    """Prefill once, then decode token by token; holds the sharded cache and counters."""

    def __init__(self, model, cp_group=None, layout="striped", prefill_strategy="tree",
                 decode="tree", ring_finish="broadcast", kernel="torch"):
        if decode not in COMBINES:
            raise ValueError(f"decode must be one of {tuple(COMBINES)}, got {decode!r}")
        self.model = model
        self.counters = DecodeCounters()  # decode steps only
        self.prefill_counters = DecodeCounters()  # the first token's broadcast
        self.comm = decode_comm(cp_group, self.counters)
        self.group = None if self.comm.size == 1 else self.comm.group
        if isinstance(layout, str):
            layout = get_layout(layout, self.comm.size)
        if layout.cp_size != self.comm.size:
            raise ValueError(f"layout {layout.name!r} is for cp_size={layout.cp_size} but the cp group has "
                             f"{self.comm.size} ranks; pass layout=get_layout(name, {self.comm.size}) or a name")
        self.layout = layout
        self.prefill_strategy = "none" if self.comm.size == 1 else prefill_strategy
        self.kernel = kernel
        combine = COMBINES[decode]
        self.combine = (lambda o, l: combine(o, l, self.comm, ring_finish)) if decode == "ring" \
            else (lambda o, l: combine(o, l, self.comm))
        self.cache: ShardedKVCache | None = None
        self.prefill_attention = None

    # --------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, prompt_ids, position_ids=None, doc_ids=None, reserve: int = 0) -> int:
        """Run the prompt (1-D) through the model on this rank's shard, fill the cache and
        return the first new token (identical on every rank)."""
        ids = torch.as_tensor(prompt_ids).reshape(-1)
        device = self.model.output_weight.device
        length = ids.shape[0]
        if length < 1:
            raise ValueError("the prompt must hold at least one token")
        pos = torch.arange(length) if position_ids is None else torch.as_tensor(position_ids).reshape(-1)
        doc = torch.zeros(length, dtype=torch.long) if doc_ids is None else torch.as_tensor(doc_ids).reshape(-1)
        if pos.shape != ids.shape or doc.shape != ids.shape:
            raise ValueError("position_ids and doc_ids must have the prompt's length")
        self.next_pos, self.doc_id, self.next_token_pos = int(pos[-1]) + 1, int(doc[-1]), length
        layout = self.layout if self.comm.size > 1 else None
        extra = 0 if layout is None else -length % layout.multiple
        full = {"input_ids": torch.cat([ids, ids.new_zeros(extra)]),
                "position_ids": torch.cat([pos, pos.new_zeros(extra)]),
                "doc_ids": torch.cat([doc, doc.new_full((extra,), PAD_DOC)]),
                "token_pos": torch.arange(length + extra)}
        masks, lengths = prompt_keep_masks(full["doc_ids"], layout, self.comm.size, self.doc_id)
        rank = self.comm.rank
        local = {k: (v if layout is None else layout.shard(v, rank, dim=0))[None].to(device)
                 for k, v in full.items()}
        per_rank = -(-reserve // self.comm.size) + 1
        self.cache = ShardedKVCache(len(self.model.layers), rank, lengths, masks[rank].to(device), per_rank)
        self.cache.set_prompt_coords(local["token_pos"][0], local["doc_ids"][0])
        self.prefill_attention = build_attention(self.prefill_strategy, layout, self.group, kernel=self.kernel)
        self.model.eval()
        prefill = [_PrefillSlot(self.prefill_attention, self.cache, i) for i in range(len(self.model.layers))]
        with self.model.attention_slot(prefill):
            hidden = self.model(local["input_ids"], local["position_ids"], local["doc_ids"], local["token_pos"])
        # The last prompt token lives on one rank: it picks the first new token and broadcasts it.
        holder = 0 if layout is None else next(
            r for r in range(self.comm.size) if bool((layout.positions(length + extra, r) == length - 1).any()))
        token = torch.zeros(1, dtype=torch.long, device=device)
        if rank == holder:
            index = int((local["token_pos"][0] == length - 1).nonzero()[0, 0])
            token[0] = self._argmax(hidden[:, index])
        if self.comm.size > 1:
            self.comm.counters = self.prefill_counters
            self.comm.broadcast(token, holder, "prefill")
            self.comm.counters = self.counters
        return int(token[0])

    # ---------------------------------------------------------------- decode
    @torch.no_grad()
    def step(self, token: int) -> int:
        """Feed ``token`` (the last one produced) and return the next, on every rank."""
        assert self.cache is not None, "call prefill first"
        device = self.model.output_weight.device
        owner = self.cache.begin_token(self.next_token_pos, self.doc_id)
        self.counters.tokens += 1
        self.counters.appended += int(owner == self.comm.rank)
        coords = {"input_ids": token, "position_ids": self.next_pos, "doc_ids": self.doc_id,
                  "token_pos": self.next_token_pos}
        x = {k: torch.tensor([[v]], dtype=torch.long, device=device) for k, v in coords.items()}
        with self.model.attention_slot([_DecodeSlot(self, i) for i in range(len(self.model.layers))]):
            hidden = self.model(x["input_ids"], x["position_ids"], x["doc_ids"], x["token_pos"])
        self.next_pos += 1
        self.next_token_pos += 1
        out = torch.tensor([self._argmax(hidden[:, -1])], dtype=torch.long, device=device)
        if self.comm.size > 1:  # rank 0's choice is everyone's, whatever the last bits of the logits
            self.comm.broadcast(out, 0, "decode")
        return int(out[0])

    def _argmax(self, hidden_row: torch.Tensor) -> int:
        return int(F.linear(hidden_row, self.model.output_weight).argmax(-1).reshape(-1)[0])


def generate(model, prompt_ids, max_new_tokens: int, cp_group=None, layout="striped",
             prefill_strategy: str = "tree", decode: str = "tree", eos_id: int | None = None,
             position_ids=None, doc_ids=None, ring_finish: str = "broadcast",
             session_out: list | None = None, kernel: str = "torch") -> torch.Tensor:
    """Greedy continuation of ``prompt_ids`` (1-D, replicated on every cp rank).

    Returns the new token ids (1-D LongTensor, same on every rank): up to
    ``max_new_tokens``, stopping after ``eos_id`` (included) if given.
    ``cp_group``: the context-parallel process group, e.g. ``dist.group.WORLD``
    or ``ParallelGroups.cp_group``; None means no context parallelism (this
    process decodes alone, even inside a larger process group). ``layout``: a name or a
    ``Layout`` over the group. ``prefill_strategy``: any ``build_attention``
    strategy except usp ("none" is used on one rank). ``decode``: "tree",
    "ring" or "butterfly" (power-of-two P); ``ring_finish``: "broadcast" | "ring" (see ``combine``).
    ``position_ids`` / ``doc_ids``: the prompt's in-document positions and
    documents (default: one document at 0..L-1). ``session_out``: a list that
    receives the ``DecodeSession`` (cache, counters) for inspection. ``kernel``: the
    prefill's local kernel.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    session = DecodeSession(model, cp_group, layout, prefill_strategy, decode, ring_finish, kernel)
    if session_out is not None:
        session_out.append(session)
    token = session.prefill(prompt_ids, position_ids, doc_ids, reserve=max_new_tokens)
    new = [token]
    while len(new) < max_new_tokens and token != eos_id:
        token = session.step(token)
        new.append(token)
    return torch.tensor(new, dtype=torch.long)


@torch.no_grad()
def single_device_greedy_choices(model, ids, num_last: int, position_ids=None, doc_ids=None) -> torch.Tensor:
    """Greedy next token after each of the last ``num_last`` prefixes of ``ids`` (1-D), from
    one single-device forward over ``ids``: causal attention makes row i exactly the
    forward over ids[:i + 1], so ``choices[j]`` is what greedy decoding picks there."""
    ids = torch.as_tensor(ids).reshape(-1)
    pos = torch.arange(len(ids)) if position_ids is None else torch.as_tensor(position_ids).reshape(-1)
    doc = torch.zeros_like(ids) if doc_ids is None else torch.as_tensor(doc_ids).reshape(-1)
    device = model.output_weight.device
    model.eval()
    with model.attention_slot(build_attention("none", kernel="torch")):
        rows = [x[None].to(device) for x in (ids, pos, doc, torch.arange(len(ids)))]
        hidden = model(*rows)
    return F.linear(hidden[0, -num_last:], model.output_weight).argmax(-1).cpu()


def single_device_generate(model, prompt_ids, max_new_tokens: int, eos_id: int | None = None,
                           position_ids=None, doc_ids=None) -> torch.Tensor:
    """Reference greedy decoding on one device: the model's full forward over the whole
    prefix at every step (no cache), with single-device attention in every slot."""
    ids = torch.as_tensor(prompt_ids).reshape(-1).tolist()
    pos = list(range(len(ids))) if position_ids is None else torch.as_tensor(position_ids).reshape(-1).tolist()
    doc = [0] * len(ids) if doc_ids is None else torch.as_tensor(doc_ids).reshape(-1).tolist()
    new: list[int] = []
    while len(new) < max_new_tokens and (not new or new[-1] != eos_id):
        token = int(single_device_greedy_choices(model, ids, 1, pos, doc)[0])
        new.append(token)
        ids, pos, doc = ids + [token], pos + [pos[-1] + 1], doc + [doc[-1]]
    return torch.tensor(new, dtype=torch.long)
