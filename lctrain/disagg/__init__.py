"""Core-attention disaggregation (DistCA): attention as token-level tasks on attention servers.

The pure, collective-free half: cut documents into tasks (``tasks``), plan
which server computes each (``scheduler``), the tensor wire format
(``protocol``) and the server's fused kernel call (``rebatch``). Every rank
computes the same plan from the all-gathered metadata, so the server/client
loop only has to move the tensors these modules describe.
"""

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
    "Field",
    "RebatchedCall",
    "ScheduledTask",
    "SchedulePlan",
    "build_task_headers",
    "doc_lengths_from_ids",
    "make_tasks",
    "metadata_width",
    "pack_metadata",
    "pack_payload",
    "pack_results",
    "plan_from_lengths",
    "rebatch",
    "schedule",
    "split_task",
    "task_cost",
    "unpack_metadata",
    "unpack_payload",
    "validate_headers",
    "visible_pairs_in_ranges",
    "write_results",
]
