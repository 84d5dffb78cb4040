"""Core-attention disaggregation (DistCA): attention as token-level tasks on attention servers.

The pure, collective-free half: cut documents into tasks (``tasks``), plan which server
computes each (``scheduler``), the wire format (``protocol``) and the server's fused kernel
call (``rebatch``). Every rank computes the same plan from the all-gathered metadata, so the
server/client loop only has to move the tensors these modules describe.

The runtime: ``runtime`` (roles, process groups, control exchange, timeouts), ``exchange``
(one call's all-to-alls and the server's compute) and ``attention`` (``DisaggAttention``, the
model's attention slot, and ``serve``, the dedicated servers' loop). The model interleaves two
half-batches itself (``Llama.interleaved_forward``) when ping-pong is on. ``cp=disagg`` is the
registered strategy (``lctrain.attention.strategies.disagg``).
"""
