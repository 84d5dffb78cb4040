"""Triton attention kernels on global token coordinates (forward, backward, tile plan).

Layers, each importing only the ones below it: ``consts`` -> ``launch`` (modes, autotune,
checks) -> ``plan_kernel`` -> ``plan`` (which tiles a program visits) -> ``tiles`` (shared
device functions) -> ``forward`` / ``backward`` (the kernels) -> ``attention`` (public entry
points and the autograd Function); ``inspection`` compiles them for a GPU target without one.
"""
