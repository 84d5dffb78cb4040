"""A cluster's figures (``conf/cluster/*.yaml``): compute, memory, links, and the efficiencies
the step-time model assumes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib.resources import files

from omegaconf import OmegaConf

CLUSTER_DIR = files("lctrain.conf") / "cluster"  # conf/cluster/, shipped inside the package


@dataclass
class ClusterConfig:
    name: str = "h100"
    gpus_per_node: int = 8
    nodes: int = 1
    peak_tflops: float = 989.0  # dense bf16 per GPU
    memory_gib: float = 79.6  # per GPU, as the device reports it
    hbm_gbps: float = 3350.0
    nvlink_gbps: float = 450.0  # per GPU per direction, inside a node
    nvlink_latency_us: float = 3.0
    ib_gbps: float = 50.0  # per GPU per direction, across nodes
    ib_latency_us: float = 8.0
    pcie_gbps: float = 50.0  # device <-> host (activation offload)
    matmul_efficiency: float = 0.6
    attention_efficiency: float = 0.4
    attention_block: int = 128  # query / key tile edge of the local attention kernel
    partial_tile_cost: float = 1.0  # a partly masked tile's time over a full tile's
    tile_overhead_us: float = 0.0  # fixed time per tile visited (a CPU kernel's per-tile dispatch)
    attention_call_us: float = 0.0  # fixed time per local kernel call (launches, the partial merge)
    cores_per_node: int = 0  # 0: a device per rank; else the ranks of a node share this many cores
    alone_speedup: float = 1.0  # a rank computing while the others wait, over all computing (shared caches)
    usable_memory: float = 0.9  # of memory_gib: the rest is the CUDA context, NCCL buffers, fragmentation

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def capacity_bytes(self) -> float:
        return self.memory_gib * 2**30 * self.usable_memory

    @property
    def shares_cores(self) -> bool:
        """More ranks than cores on a node (CPU ranks)."""
        return bool(self.cores_per_node) and self.gpus_per_node > self.cores_per_node

    def link(self, group_size: int) -> tuple[float, float]:
        """(bytes/s, seconds of latency) of the slowest link a group of ``group_size`` consecutive
        ranks uses: NVLink inside one node, InfiniBand once it spans nodes."""
        if group_size <= self.gpus_per_node:
            return self.nvlink_gbps * 1e9, self.nvlink_latency_us * 1e-6
        return self.ib_gbps * 1e9, self.ib_latency_us * 1e-6


def cluster_names() -> list[str]:
    return sorted(p.name[:-len(".yaml")] for p in CLUSTER_DIR.iterdir() if p.name.endswith(".yaml"))


def load_cluster(overrides: list[str]) -> ClusterConfig:
    """``cluster=NAME`` picks a preset (default h100); ``cluster.FIELD=VALUE`` overrides a figure."""
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("cluster=")), "h100")
    if name not in cluster_names():
        raise ValueError(f"cluster={name!r} is not a preset; choose one of {', '.join(cluster_names())}")
    cfg = OmegaConf.merge(OmegaConf.structured(ClusterConfig), OmegaConf.create((CLUSTER_DIR / f"{name}.yaml").read_text()))
    known = {f.name for f in fields(ClusterConfig)}
    for item in overrides:
        if not item.startswith("cluster."):
            continue
        key, _, value = item[len("cluster."):].partition("=")
        if key not in known:
            raise ValueError(f"cluster.{key} is not a cluster field; known: {', '.join(sorted(known))}")
        OmegaConf.update(cfg, key, value)  # typed fields convert the string ("4" -> 4)
    return OmegaConf.to_object(cfg)
