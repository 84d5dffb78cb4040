from lctrain.distributed.setup import (
    DistEnv,
    all_ranks_flag,
    broadcast_string,
    gather_strings,
    init_distributed,
    shutdown_distributed,
)

__all__ = [
    "DistEnv",
    "all_ranks_flag",
    "broadcast_string",
    "gather_strings",
    "init_distributed",
    "shutdown_distributed",
]
