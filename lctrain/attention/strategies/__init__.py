"""The registered attention strategies, one module each; importing this package registers them.

``none`` (local), ``ring`` (any layout: Ring / Striped / zigzag attention), ``allgather``,
``ulysses``, ``usp`` (Ulysses x ring), ``tree`` and ``disagg`` (core-attention servers).
"""

# Registration order is the order the options are listed in (cp=none first).
from . import local, ring, allgather, ulysses, usp, tree, disagg  # noqa: F401,I001  (registration)
from .base import AttentionCall, AttentionSetup, Strategy, get_strategy, register, strategy_names

__all__ = ["AttentionCall", "AttentionSetup", "Strategy", "get_strategy", "register", "strategy_names"]
