"""The attention API: reference, coordinates and mask, local kernels, merge, layouts, strategies."""

from lctrain_kernels.mask import CAUSAL, Coords, Mask
from lctrain_kernels.torch_blockwise import blockwise_attention

from .api import build_attention, setup_attention
from .counters import AttentionCounters
from .layouts import Layout, get_layout
from .merge import merge_partials
from .reference import reference_attention
from .strategies import AttentionCall, strategy_names

__all__ = [
    "CAUSAL",
    "AttentionCall",
    "AttentionCounters",
    "Coords",
    "Layout",
    "Mask",
    "blockwise_attention",
    "build_attention",
    "get_layout",
    "merge_partials",
    "reference_attention",
    "setup_attention",
    "strategy_names",
]
