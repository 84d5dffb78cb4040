"""The attention API: reference, local kernels, partial merging, layouts, build_attention."""

from lctrain_kernels.torch_blockwise import blockwise_attention

from .api import LocalAttention, build_attention
from .layouts import Layout, get_layout
from .merge import merge_partials
from .reference import reference_attention

__all__ = [
    "Layout",
    "LocalAttention",
    "blockwise_attention",
    "build_attention",
    "get_layout",
    "merge_partials",
    "reference_attention",
]
