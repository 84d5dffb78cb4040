"""The wire format between workers and attention servers: flat tensors, no pickle.

Every message travels by all_gather / all_to_all_single, and every rank computes each
message's size from the plan, so nothing is sent to announce sizes. Per attention call:

1. control row (every rank, all-gathered): int64 ``[opcode, slot, causal, window (-1:
   none), scale as float64 bits (0: default), num_heads, num_kv_heads, head_dim, wire
   dtype index]`` (``NUM_CONTROL`` fields), then the worker's metadata ``[MAGIC, VERSION,
   rank, num_docs, num_pad_tokens, len_0, ..., len_{max_docs-1}]``, zero-padded to a
   width every rank agrees on. Servers send an all-zero IDLE row; a dedicated server that
   aborted a call sends ``[ABORT, status, culprit rank]``.
2. task headers (worker -> server): an (N, NUM_FIELDS) int64 table, one row per task in
   task_id order, see ``Field``.
3. request (worker -> server), in the wire dtype (q's dtype): every task's q (q_len, h,
   d), k and v (kv_len, h_kv, d), in header order (the headers' payload offsets address
   this part); a BACKWARD request then carries every task's dout (q_len, h, d), lse and
   delta (h, q_len).
4. results (server -> worker): a status head, the int64 pair (status, culprit rank), then
   per task out (q_len, h, d) and lse (h, q_len) for FORWARD, or dq (q_len, h, d), dk and
   dv (kv_len, h_kv, d) for BACKWARD. Every server sends the head to every worker, even
   to one it has no tasks of, so a failing server can tell all of them.

lse, delta and the gradients stay in the accumulation dtype (float32; float64 on a float64
wire), bit-cast to the wire dtype, so a bf16 wire rounds none of them. Receivers validate
before indexing anything, so a desynchronised or buggy peer fails with a ValueError
naming it instead of reading garbage.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import torch

from lctrain_kernels.mask import Mask
from lctrain_kernels.reference import accumulation_dtype

IDLE, FORWARD, BACKWARD, STOP, ABORT = 0, 1, 2, 3, 4
OPCODES = {IDLE: "IDLE", FORWARD: "FORWARD", BACKWARD: "BACKWARD", STOP: "STOP", ABORT: "ABORT"}
OK, MALFORMED, FAILED = 0, 1, 2  # a server's status of one call; MALFORMED comes with the culprit sender
NUM_SLOTS = 2  # calls in flight at once (ping-pong), each on its own process group
WIRE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
NUM_CONTROL = 9  # control fields before the metadata
STATUS_BYTES = 16  # (status, culprit rank) as int64

META_MAGIC = 0x4C43_4441  # "LCDA"
META_VERSION = 1
META_HEADER = 5  # magic, version, rank, num_docs, num_pad_tokens


class MalformedRequest(ValueError):
    """A request's task headers are malformed or disagree with the server's plan; ``sender`` sent them."""

    def __init__(self, message: str, sender: int):
        super().__init__(message)
        self.sender = sender


# ----------------------------------------------------------------------------- control


@dataclass(frozen=True)
class CallSpec:
    """What the workers asked for; identical on every rank after the control exchange."""

    op: int
    slot: int
    causal: bool
    window: int | None
    scale: float | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the wire dtype: q's
    lengths: tuple[tuple[int, ...], ...] = ()  # every worker's document lengths, from the exchange

    @property
    def mask(self) -> Mask:
        return Mask(self.causal, self.window)


STOP_CALL = CallSpec(STOP, 0, True, None, None, 0, 0, 0, torch.float32)


def _float_bits(x: float | None) -> int:
    return 0 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(bits: int) -> float | None:
    return None if bits == 0 else struct.unpack("<d", struct.pack("<q", bits))[0]


def _control_row(max_docs: int, *fields: int) -> torch.Tensor:
    row = torch.zeros(NUM_CONTROL + metadata_width(max_docs), dtype=torch.int64)
    row[:len(fields)] = torch.tensor(fields, dtype=torch.int64)
    return row


def control_row(rank: int, max_docs: int, spec: CallSpec | None = None, lengths=None) -> torch.Tensor:
    """A worker's row asking for ``spec`` on its documents ``lengths``; without ``spec``, a server's IDLE."""
    if spec is None:
        return _control_row(max_docs, IDLE)
    row = _control_row(max_docs, spec.op, spec.slot, int(spec.causal), -1 if spec.window is None else spec.window,
                       _float_bits(spec.scale), spec.num_heads, spec.num_kv_heads, spec.head_dim,
                       WIRE_DTYPES.index(spec.dtype))
    row[NUM_CONTROL:] = pack_metadata(lengths, rank, max_docs)
    return row


def abort_row(status: int, culprit: int, max_docs: int) -> torch.Tensor:
    return _control_row(max_docs, ABORT, status, culprit)


def read_abort(row: torch.Tensor) -> tuple[int, int] | None:
    """(status, culprit) of an ABORT row; None for any other row."""
    return tuple(row[1:3].tolist()) if int(row[0]) == ABORT else None


def parse_control(rows: Sequence[torch.Tensor], num_workers: int) -> CallSpec:
    """The call every worker (ranks 0..num_workers-1) asked for; ValueError naming the rank that disagrees."""
    head = rows[0][:NUM_CONTROL].tolist()
    for r in range(1, num_workers):
        other = rows[r][:NUM_CONTROL].tolist()
        if other != head:
            raise ValueError(f"disagg workers out of step: rank {r} sent control {other} but rank 0 sent "
                             f"{head} (different opcodes, slots, shapes or settings)")
    op, slot, causal, window, scale, num_heads, num_kv_heads, head_dim, dtype = head
    if op == STOP:
        return STOP_CALL
    if op not in (FORWARD, BACKWARD) or not 0 <= slot < NUM_SLOTS or not 0 <= dtype < len(WIRE_DTYPES):
        raise ValueError(f"malformed disagg control from rank 0: {head} (ranks run different lctrain versions?)")
    lengths = tuple(tuple(unpack_metadata(rows[r][NUM_CONTROL:], r)[0]) for r in range(num_workers))
    return CallSpec(op, slot, bool(causal), None if window < 0 else window, _bits_float(scale), num_heads,
                    num_kv_heads, head_dim, WIRE_DTYPES[dtype], lengths)


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
    PAYLOAD_OFFSET = 8  # elements into the request where this task's q starts
    PAYLOAD_NUMEL = 9  # its q, k, v: (q_len * h + 2 * kv_len * h_kv) * d
    NUM_HEADS = 10
    NUM_KV_HEADS = 11
    HEAD_DIM = 12


NUM_FIELDS = len(Field)


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
    """MalformedRequest naming ``sender_rank`` unless the headers describe ``payload_numel_total`` q/k/v
    elements exactly."""

    def fail(problem: str):
        raise MalformedRequest(f"malformed task headers from rank {sender_rank}: {problem}", sender_rank)

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


def check_request_headers(rows: torch.Tensor, scheduled: Sequence, spec: CallSpec, sender: int,
                          receiver: int) -> None:
    """MalformedRequest naming ``sender`` unless its headers are well formed and equal this server's plan
    (``scheduled``: the tasks ``sender`` sends ``receiver``, in task_id order)."""
    expected = build_task_headers(scheduled, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    validate_headers(rows, int(expected[:, Field.PAYLOAD_NUMEL].sum()), sender, receiver_rank=receiver,
                     num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim)
    if not torch.equal(rows, expected):
        bad = int((rows != expected).any(dim=1).nonzero()[0])
        raise MalformedRequest(f"malformed task headers from rank {sender}: row {bad} is {rows[bad].tolist()} but "
                               f"this server's plan says {expected[bad].tolist()} (ranks computed different plans)",
                               sender)


# ----------------------------------------------------------------------------- requests and results


class Part(NamedTuple):
    """One tensor of a task's request or result."""

    tokens: str  # "q": one row per query of the task, "kv": per key
    stat: bool  # a softmax statistic (heads, tokens), not values (tokens, heads, head_dim)
    accumulated: bool  # in the accumulation dtype, bit-cast to the wire dtype


_VALUES, _KEYS, _STAT = Part("q", False, False), Part("kv", False, False), Part("q", True, True)
QKV_PARTS = {"q": _VALUES, "k": _KEYS, "v": _KEYS}
BACKWARD_PARTS = {"dout": _VALUES, "lse": _STAT, "delta": _STAT}
REQUEST_SECTIONS = {FORWARD: (QKV_PARTS,), BACKWARD: (QKV_PARTS, BACKWARD_PARTS)}  # every task's, in turn
RESULT_PARTS = {FORWARD: {"out": _VALUES, "lse": _STAT},
                BACKWARD: {"dq": Part("q", False, True), "dk": Part("kv", False, True), "dv": Part("kv", False, True)}}


def _layout(part: Part, spec: CallSpec, task) -> tuple[tuple[int, ...], torch.dtype, int]:
    """(shape, dtype, wire elements) of ``part`` for one task."""
    tokens, heads = (task.q_len, spec.num_heads) if part.tokens == "q" else (task.kv_len, spec.num_kv_heads)
    shape = (heads, tokens) if part.stat else (tokens, heads, spec.head_dim)
    dtype = accumulation_dtype(spec.dtype) if part.accumulated else spec.dtype
    return shape, dtype, math.prod(shape) * dtype.itemsize // spec.dtype.itemsize


def request_numel(spec: CallSpec, task) -> int:
    """Wire elements of one task's request."""
    return sum(_layout(p, spec, task)[2] for section in REQUEST_SECTIONS[spec.op] for p in section.values())


def result_numel(spec: CallSpec, task) -> int:
    """Wire elements of one task's results (the status head not counted)."""
    return sum(_layout(p, spec, task)[2] for p in RESULT_PARTS[spec.op].values())


def status_numel(dtype: torch.dtype) -> int:
    return STATUS_BYTES // dtype.itemsize


def to_wire(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Flat view of ``x`` in the wire dtype (bit-cast, so fp32 lse survives a bf16 payload)."""
    return x.contiguous().view(-1).view(dtype) if x.dtype != dtype else x.reshape(-1)


def from_wire(flat: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    # A slice of a received buffer may sit at an offset the wider dtype cannot view: copy it first.
    return (flat.clone().view(dtype) if flat.dtype != dtype else flat).view(shape)


def _unpack(flat: torch.Tensor, spec: CallSpec, tasks: Sequence, parts) -> tuple[list[tuple], torch.Tensor]:
    """Per task its ``parts`` read off the front of ``flat``, and the rest of ``flat``."""
    per_task, offset = [], 0
    for task in tasks:
        tensors = []
        for part in parts:
            shape, dtype, numel = _layout(part, spec, task)
            tensors.append(from_wire(flat[offset:offset + numel], dtype, shape))
            offset += numel
        per_task.append(tuple(tensors))
    return per_task, flat[offset:]


def _task_slice(x: torch.Tensor, part: Part, task) -> torch.Tensor:
    rows = slice(task.q_start, task.q_end) if part.tokens == "q" else slice(task.kv_start, task.kv_end)
    return x[:, rows] if part.stat else x[rows]


def pack_request(spec: CallSpec, tasks: Sequence, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One worker's request to one server for ``tasks`` (``AttentionTask``s in task_id order).

    ``tensors``: the worker's q, k, v (tokens, heads, head_dim), and for BACKWARD dout and
    lse, delta (heads, tokens), all in its local token coordinates.
    """
    return torch.cat([to_wire(_task_slice(tensors[name], part, task), spec.dtype)
                      for section in REQUEST_SECTIONS[spec.op] for task in tasks for name, part in section.items()])


def unpack_request(spec: CallSpec, tasks: Sequence, request: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per task (q, k, v) or, for BACKWARD, (q, k, v, dout, lse, delta) of a ``pack_request`` message."""
    qkv, rest = _unpack(request, spec, tasks, QKV_PARTS.values())
    if spec.op == FORWARD:
        return qkv
    extras, _ = _unpack(rest, spec, tasks, BACKWARD_PARTS.values())
    return [a + b for a, b in zip(qkv, extras)]


def _status_head(status: int, culprit: int, dtype: torch.dtype) -> torch.Tensor:
    return to_wire(torch.tensor([status, culprit], dtype=torch.int64), dtype)


def pack_results(spec: CallSpec, task_results: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """A server's answer to one worker: status OK, then per task (out, lse) or (dq, dk, dv) in task order."""
    return torch.cat([_status_head(OK, -1, spec.dtype), *(to_wire(x, spec.dtype) for r in task_results for x in r)])


def abort_results(spec: CallSpec, tasks: Sequence, status: int, culprit: int) -> torch.Tensor:
    """What a failing server sends a worker in place of ``tasks``' results: the status, then zeros."""
    zeros = torch.zeros(sum(result_numel(spec, t) for t in tasks), dtype=spec.dtype)
    return torch.cat([_status_head(status, culprit, spec.dtype), zeros])


def read_status(message: torch.Tensor, dtype: torch.dtype) -> tuple[int, int]:
    """(status, culprit) at the head of a server's results message."""
    return tuple(from_wire(message[:status_numel(dtype)], torch.int64, (2,)).tolist())


def unpack_results(spec: CallSpec, tasks: Sequence, message: torch.Tensor, sender: int) -> list[tuple]:
    """Per task (out, lse) or (dq, dk, dv) of ``sender``'s results message; ValueError naming it on a bad size."""
    body = message[status_numel(spec.dtype):]
    expected = sum(result_numel(spec, t) for t in tasks)
    if body.numel() != expected:
        raise ValueError(f"malformed results from rank {sender}: {body.numel()} elements after the status, "
                         f"but its {len(tasks)} tasks need {expected} (ranks computed different plans)")
    return _unpack(body, spec, tasks, RESULT_PARTS[spec.op].values())[0]
