"""Core-attention disaggregation (DistCA): attention as token-level tasks on attention servers.

The pure, collective-free half: cut documents into tasks (``tasks``), plan
which server computes each (``scheduler``), the tensor wire format
(``protocol``) and the server's fused kernel call (``rebatch``). Every rank
computes the same plan from the all-gathered metadata, so the server/client
loop only has to move the tensors these modules describe.

The runtime: ``runtime`` (roles, process groups, control exchange, timeouts),
``exchange`` (one call's all-to-alls and the server's compute), ``attention``
(``DisaggAttention``, ``build_disagg_attention``, ``serve``) and ``pingpong``
(two half-batches interleaved layer by layer).
"""

from .attention import DisaggAttention, build_disagg_attention, serve
from .pingpong import pingpong_forward
from .protocol import (
    NUM_FIELDS,
    Field,
    build_task_headers,
    metadata_width,
    pack_metadata,
    pack_payload,
    pack_results,
    unpack_metadata,
    unpack_payload,
    validate_headers,
    write_results,
)
from .rebatch import RebatchedCall, rebatch
from .runtime import DisaggRuntime, DisaggServerError
from .scheduler import AttentionShape, ScheduledTask, SchedulePlan, plan_from_lengths, schedule
from .tasks import (
    DEFAULT_CHUNK_TOKENS,
    AttentionTask,
    doc_lengths_from_ids,
    make_tasks,
    split_task,
    task_cost,
    visible_pairs_in_ranges,
)

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "NUM_FIELDS",
    "AttentionShape",
    "AttentionTask",
    "DisaggAttention",
    "DisaggRuntime",
    "DisaggServerError",
    "Field",
    "RebatchedCall",
    "ScheduledTask",
    "SchedulePlan",
    "build_disagg_attention",
    "build_task_headers",
    "doc_lengths_from_ids",
    "make_tasks",
    "metadata_width",
    "pack_metadata",
    "pack_payload",
    "pack_results",
    "pingpong_forward",
    "plan_from_lengths",
    "rebatch",
    "schedule",
    "serve",
    "split_task",
    "task_cost",
    "unpack_metadata",
    "unpack_payload",
    "validate_headers",
    "visible_pairs_in_ranges",
    "write_results",
]
