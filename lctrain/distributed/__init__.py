from lctrain.distributed.setup import (
    DistEnv,
    all_ranks_flag,
    broadcast_string,
    init_distributed,
    reduce_gradients,
    shutdown_distributed,
)

__all__ = [
    "DistEnv",
    "all_ranks_flag",
    "broadcast_string",
    "init_distributed",
    "reduce_gradients",
    "shutdown_distributed",
]
