"""Wire format between workers and attention servers: int64 tensors and flat payloads, no pickle.

Three messages, all plain tensors so they travel by all_gather / all_to_all_single:

- metadata (one per worker, gathered by all): ``[MAGIC, VERSION, rank, num_docs,
  num_pad_tokens, len_0, ..., len_{max_docs-1}]``, zero-padded to a width every
  rank agrees on (from the config), so it all-gathers as one tensor;
- task headers (worker -> server): an (N, NUM_FIELDS) int64 table, one row per
  task in task_id order, see ``Field``;
- payloads: per task its q (q_len, h, d), then k and v (kv_len, h_kv, d),
  flattened and concatenated; results come back as one flat ``out`` and one
  flat ``lse`` tensor in the same task order.

Receivers validate before indexing anything, so a desynchronised or buggy
peer fails with a ValueError naming it instead of reading garbage.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import torch

META_MAGIC = 0x4C43_4441  # "LCDA"
META_VERSION = 1
META_HEADER = 5  # magic, version, rank, num_docs, num_pad_tokens


class Field(IntEnum):
    """Columns of a task header row."""

    TASK_ID = 0
    WORKER = 1
    SERVER = 2
    DOC = 3
    Q_START = 4
    Q_LEN = 5
    KV_START = 6
    KV_LEN = 7
    PAYLOAD_OFFSET = 8  # elements into the sender's payload where this task's q starts
    PAYLOAD_NUMEL = 9  # (q_len * h + 2 * kv_len * h_kv) * d
    NUM_HEADS = 10
    NUM_KV_HEADS = 11
    HEAD_DIM = 12


NUM_FIELDS = len(Field)


# ----------------------------------------------------------------------------- metadata


def metadata_width(max_docs: int) -> int:
    return META_HEADER + max_docs


def pack_metadata(doc_lengths: Sequence[int], rank: int, max_docs: int, num_pad_tokens: int = 0) -> torch.Tensor:
    """One worker's document lengths as a (META_HEADER + max_docs,) int64 tensor."""
    if len(doc_lengths) > max_docs:
        raise ValueError(f"rank {rank} holds {len(doc_lengths)} documents but max_docs={max_docs}; "
                         f"raise max_docs (it bounds the gathered metadata width)")
    if any(n < 1 for n in doc_lengths) or num_pad_tokens < 0:
        raise ValueError(f"rank {rank}: document lengths must be >= 1 and padding >= 0, "
                         f"got {list(doc_lengths)} and {num_pad_tokens}")
    meta = torch.zeros(metadata_width(max_docs), dtype=torch.int64)
    meta[:META_HEADER] = torch.tensor([META_MAGIC, META_VERSION, rank, len(doc_lengths), num_pad_tokens])
    meta[META_HEADER:META_HEADER + len(doc_lengths)] = torch.tensor(list(doc_lengths), dtype=torch.int64)
    return meta


def unpack_metadata(meta: torch.Tensor, sender_rank: int, seq_len: int | None = None) -> tuple[list[int], int]:
    """(doc_lengths, num_pad_tokens) of ``sender_rank``'s metadata, validated."""

    def fail(problem: str):
        raise ValueError(f"malformed metadata from rank {sender_rank}: {problem}")

    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int64 or meta.dim() != 1:
        fail(f"expected a 1-D int64 tensor, got {getattr(meta, 'dtype', type(meta))} "
             f"{tuple(getattr(meta, 'shape', ()))}")
    if meta.numel() < META_HEADER:
        fail(f"{meta.numel()} entries, fewer than the {META_HEADER}-entry header")
    values = meta.tolist()
    magic, version, rank, num_docs, num_pad = values[:META_HEADER]
    lengths = values[META_HEADER:]
    if magic != META_MAGIC:
        fail(f"magic {magic:#x} != {META_MAGIC:#x} (not a metadata tensor, or ranks out of step)")
    if version != META_VERSION:
        fail(f"version {version} != {META_VERSION} (ranks run different lctrain versions)")
    if rank != sender_rank:
        fail(f"it claims to come from rank {rank}")
    if not 0 <= num_docs <= len(lengths):
        fail(f"num_docs {num_docs} outside 0..{len(lengths)}")
    if num_pad < 0 or any(n < 1 for n in lengths[:num_docs]) or any(lengths[num_docs:]):
        fail(f"lengths must be >= 1 for the {num_docs} documents and 0 after, padding >= 0; "
             f"got padding {num_pad} and lengths {lengths[:num_docs + 1]}...")
    if seq_len is not None and sum(lengths[:num_docs]) + num_pad != seq_len:
        fail(f"documents + padding hold {sum(lengths[:num_docs]) + num_pad} tokens, expected {seq_len}")
    return lengths[:num_docs], num_pad


# ----------------------------------------------------------------------------- task headers


def payload_numel(q_len: int, kv_len: int, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    return (q_len * num_heads + 2 * kv_len * num_kv_heads) * head_dim


def build_task_headers(scheduled_tasks: Sequence, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """(N, NUM_FIELDS) headers of ``ScheduledTask``s in the given order, payload offsets contiguous."""
    rows, offset = [], 0
    for item in scheduled_tasks:
        t = item.task
        numel = payload_numel(t.q_len, t.kv_len, num_heads, num_kv_heads, head_dim)
        rows.append([item.task_id, t.worker, item.server, t.doc, t.q_start, t.q_len, t.kv_start, t.kv_len,
                     offset, numel, num_heads, num_kv_heads, head_dim])
        offset += numel
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), NUM_FIELDS)


def validate_headers(headers: torch.Tensor, payload_numel_total: int, sender_rank: int, *,
                     receiver_rank: int | None = None, num_heads: int | None = None,
                     num_kv_heads: int | None = None, head_dim: int | None = None) -> None:
    """Raise ValueError naming ``sender_rank`` unless the headers describe ``payload_numel_total`` exactly."""

    def fail(problem: str):
        raise ValueError(f"malformed task headers from rank {sender_rank}: {problem}")

    if not isinstance(headers, torch.Tensor) or headers.dtype != torch.int64 or headers.dim() != 2 \
            or headers.shape[1] != NUM_FIELDS:
        fail(f"expected an (N, {NUM_FIELDS}) int64 tensor, got {getattr(headers, 'dtype', type(headers))} "
             f"{tuple(getattr(headers, 'shape', ()))}")
    rows = headers.tolist()
    if not rows:
        if payload_numel_total != 0:
            fail(f"no tasks but a payload of {payload_numel_total} elements")
        return
    cols = list(zip(*rows))
    for name in ("TASK_ID", "DOC", "Q_START", "Q_LEN", "KV_START", "KV_LEN", "PAYLOAD_OFFSET"):
        bad = [i for i, x in enumerate(cols[Field[name]]) if x < 0]
        if bad:
            fail(f"negative {name.lower()} in row {bad[0]} ({rows[bad[0]][Field[name]]})")
    if len(set(cols[Field.TASK_ID])) != len(rows):
        fail("duplicate task ids")
    if any(w != sender_rank for w in cols[Field.WORKER]):
        fail(f"rows name workers {sorted(set(cols[Field.WORKER]))}, expected only the sender")
    if receiver_rank is not None and any(s != receiver_rank for s in cols[Field.SERVER]):
        fail(f"rows name servers {sorted(set(cols[Field.SERVER]))}, but they arrived at rank {receiver_rank}")
    shapes = set(zip(cols[Field.NUM_HEADS], cols[Field.NUM_KV_HEADS], cols[Field.HEAD_DIM]))
    if len(shapes) != 1:
        fail(f"rows disagree on (num_heads, num_kv_heads, head_dim): {sorted(shapes)}")
    h, h_kv, d = shapes.pop()
    if h < 1 or h_kv < 1 or d < 1 or h % h_kv:
        fail(f"(num_heads, num_kv_heads, head_dim) = {(h, h_kv, d)}: need >= 1 and num_heads % num_kv_heads == 0")
    for name, want, got in (("num_heads", num_heads, h), ("num_kv_heads", num_kv_heads, h_kv),
                            ("head_dim", head_dim, d)):
        if want is not None and want != got:
            fail(f"{name} {got} != {want} expected by the receiver")
    offset = 0
    for i, row in enumerate(rows):
        numel = payload_numel(row[Field.Q_LEN], row[Field.KV_LEN], h, h_kv, d)
        if row[Field.PAYLOAD_NUMEL] != numel:
            fail(f"row {i} payload_numel {row[Field.PAYLOAD_NUMEL]} != {numel} from its lengths and heads")
        if row[Field.PAYLOAD_OFFSET] != offset:
            fail(f"row {i} payload_offset {row[Field.PAYLOAD_OFFSET]} != {offset} (payload not contiguous)")
        offset += numel
    if offset != payload_numel_total:
        fail(f"rows describe {offset} payload elements but {payload_numel_total} arrived")


# ----------------------------------------------------------------------------- payloads


def _tokens_heads_dim(x: torch.Tensor, name: str) -> torch.Tensor:
    """(s, h, d) view of a worker's local tensor, accepting a batch of one."""
    if x.dim() == 4 and x.shape[0] == 1:
        return x[0]
    if x.dim() != 3:
        raise ValueError(f"{name} must be (seq, heads, head_dim) or (1, seq, heads, head_dim), got {tuple(x.shape)}")
    return x


def pack_payload(headers: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The sender's flat payload for ``headers``: per row q[q_range], k[kv_range], v[kv_range]."""
    q, k, v = (_tokens_heads_dim(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    pieces = []
    for row in headers.tolist():
        qs, ql, ks, kl = row[Field.Q_START], row[Field.Q_LEN], row[Field.KV_START], row[Field.KV_LEN]
        pieces += [q[qs:qs + ql].reshape(-1), k[ks:ks + kl].reshape(-1), v[ks:ks + kl].reshape(-1)]
    return torch.cat(pieces) if pieces else q.new_empty(0)


def unpack_payload(headers: torch.Tensor, payload: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per row (q (q_len, h, d), k, v (kv_len, h_kv, d)) views into a validated payload."""
    out = []
    for row in headers.tolist():
        h, h_kv, d = row[Field.NUM_HEADS], row[Field.NUM_KV_HEADS], row[Field.HEAD_DIM]
        q_numel, kv_numel = row[Field.Q_LEN] * h * d, row[Field.KV_LEN] * h_kv * d
        flat = payload.narrow(0, row[Field.PAYLOAD_OFFSET], row[Field.PAYLOAD_NUMEL])
        q, k, v = flat.split([q_numel, kv_numel, kv_numel])
        out.append((q.view(-1, h, d), k.view(-1, h_kv, d), v.view(-1, h_kv, d)))
    return out


def pack_results(results: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task (out (q_len, h, d), lse (h, q_len)) -> (flat out, flat lse), same task order as the headers."""
    outs = [o.reshape(-1) for o, _ in results]
    lses = [l.reshape(-1) for _, l in results]
    if not results:
        return torch.empty(0), torch.empty(0)
    return torch.cat(outs), torch.cat(lses)


def write_results(headers: torch.Tensor, out_flat: torch.Tensor, lse_flat: torch.Tensor, sender_rank: int,
                  out_local: torch.Tensor, lse_local: torch.Tensor) -> None:
    """Scatter a server's flat results for ``headers`` into the worker's out (s, h, d) and lse (h, s).

    The worker built ``headers`` itself, so only the sizes of what arrived need checking.
    """
    rows = headers.tolist()
    q_tokens = sum(r[Field.Q_LEN] for r in rows)
    h, d = (rows[0][Field.NUM_HEADS], rows[0][Field.HEAD_DIM]) if rows else (0, 0)
    if out_flat.numel() != q_tokens * h * d or lse_flat.numel() != q_tokens * h:
        raise ValueError(f"malformed results from rank {sender_rank}: {out_flat.numel()} out and "
                         f"{lse_flat.numel()} lse elements for {q_tokens} query tokens x {h} heads x {d} dims")
    out_offset = lse_offset = 0
    for row in rows:
        qs, ql = row[Field.Q_START], row[Field.Q_LEN]
        out_local[qs:qs + ql] = out_flat[out_offset:out_offset + ql * h * d].view(ql, h, d)
        lse_local[:, qs:qs + ql] = lse_flat[lse_offset:lse_offset + ql * h].view(h, ql)
        out_offset, lse_offset = out_offset + ql * h * d, lse_offset + ql * h
