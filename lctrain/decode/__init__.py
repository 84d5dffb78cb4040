"""Distributed greedy decoding with the KV cache sharded along the sequence over the cp ranks.

``session`` (prefill + token-by-token decode, ``generate``), ``cache`` (the sharded KV cache),
``combine`` (tree / ring / butterfly combination of per-rank partials), ``passkey`` (passkey
answers decoded greedily) and ``cli`` (``lctrain-generate``).
"""

from .combine import COMBINES, DecodeCounters
from .session import DecodeSession, generate, single_device_generate, single_device_greedy_choices

__all__ = ["COMBINES", "DecodeCounters", "DecodeSession", "generate", "single_device_generate",
           "single_device_greedy_choices"]
