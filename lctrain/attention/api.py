"""build_attention: the one entry point that fills the model's attention slot.

``strategy`` is looked up in the registry (``lctrain.attention.strategies``): "none" is
single-device attention through a local kernel; the context-parallel strategies take this
rank's shard of the sequence (as the layout deals it) plus the global ``Coords`` of its
tokens; "disagg" sends attention to core-attention servers.
"""

from __future__ import annotations

from .counters import AttentionCounters
from .local_kernels import check_kernel_name
from .strategies import AttentionCall, AttentionSetup, get_strategy


def build_attention(strategy: str = "none", layout=None, group=None, kernel: str = "auto",
                    check_shapes: bool = True, count: bool = False, **options) -> AttentionCall:
    """The attention callable for ``strategy`` over ``layout`` / ``group`` with ``kernel``.

    strategy "none": single-device (layout and group must be None). "ring", "allgather",
    "ulysses", "usp", "tree": context parallel over ``group`` (None = the default group) with
    the sequence dealt by ``layout`` (``get_layout(name, cp_size)``). Strategy options:
    "tree" ``query_chunk`` (gathered query tokens per rank held at once); "usp"
    ``subgroups=build_parallel_groups(..., ulysses_size=U).usp_groups``, or with ``group``
    None, ``ulysses_size=U`` to factor the default group (every rank must call it);
    "disagg" ``mode``, ``num_servers``, ``chunk_tokens``, ``timeout_s``, ``max_docs``,
    ``ping_pong``. ``count=True``: the callable's ``counters`` record pairs, bytes and
    messages of this rank (off by default: counting costs work per call).
    """
    kernel = check_kernel_name(kernel)
    counters = AttentionCounters() if count else None
    return get_strategy(strategy).build(layout=layout, group=group, kernel=kernel, counters=counters,
                                        check_shapes=check_shapes, **options)


def setup_attention(cfg, env) -> AttentionSetup:
    """The attention of this rank and the groups, layout and roles it implies, from the typed
    config (``cp.strategy`` and its settings, ``kernel.name``, ``cp.count``)."""
    counters = AttentionCounters() if cfg.cp.count else None
    return get_strategy(cfg.cp.strategy).setup(cfg, env, counters)
