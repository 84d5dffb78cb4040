"""Model definitions, written for one device (parallelism is applied from outside)."""

from lctrain.models.llama import Llama, LlamaShape
from lctrain.models.loss import chunked_cross_entropy

__all__ = ["Llama", "LlamaShape", "chunked_cross_entropy"]
