"""Cluster specifications: the hardware a layout (:class:`piper_ds.system.layout.Layout`) runs on.

A :class:`ClusterSpec` is the hardware: GPUs per node, memory, peak rate, and three link tiers (inside a node,
between nodes of one switch group, between groups), each as an alpha-beta pair.
"""
from __future__ import annotations

from typing import Dict, Optional

from pydantic import BaseModel, ConfigDict, Field

GIB = 1024 ** 3


class LinkTier(BaseModel):
    """One tier of the network seen by one GPU, as an alpha-beta model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bw_gbps: float = Field(..., gt=0, description="Achievable bandwidth per GPU per direction, GB/s (1e9 B/s).")
    latency_us: float = Field(..., ge=0, description="Fixed cost of one collective or transfer, microseconds.")
    per_peer_us: float = Field(0.0, ge=0, description="Extra cost per peer of an all-to-all, microseconds.")

    def seconds(self, nbytes: float, peers: int = 1) -> float:
        """Time to move ``nbytes`` from one GPU over this tier to ``peers`` peers, seconds."""
        if nbytes <= 0:
            return 0.0
        return (self.latency_us + self.per_peer_us * max(peers, 1)) * 1e-6 + nbytes / (self.bw_gbps * 1e9)


class ClusterSpec(BaseModel):
    """A homogeneous GPU cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("custom", description="Label of the cluster (a preset name or 'custom').")
    gpus_per_node: int = Field(..., ge=1, description="GPUs (or GCDs) per node; the fast all-to-all domain.")
    n_nodes: Optional[int] = Field(None, ge=1, description="Nodes available; None = as many as a job asks.")
    hbm_gib: float = Field(..., gt=0, description="Device memory per GPU as the framework sees it, GiB.")
    peak_tflops: float = Field(..., gt=0, description="Dense bf16 peak per GPU, TFLOP/s (the MFU denominator).")
    gemm_efficiency: float = Field(
        0.68, gt=0, le=1, description="Large dense bf16 GEMM rate achieved / peak (measured: 673/989.5 on one H200).")
    hbm_tbps: float = Field(..., gt=0, description="Achievable HBM bandwidth per GPU, TB/s (read + write).")
    intra_node: LinkTier = Field(..., description="GPU-to-GPU links inside a node (NVLink, Infinity Fabric).")
    inter_node: LinkTier = Field(..., description="Between nodes of one switch group: NIC bandwidth per GPU.")
    inter_group: LinkTier = Field(..., description="Between switch/dragonfly groups: per-GPU share, tapered.")
    nodes_per_group: Optional[int] = Field(
        None, ge=1, description="Nodes under one switch group; None = the whole cluster is one group.")

    @property
    def hbm_bytes(self) -> float:
        """Device memory per GPU in bytes."""
        return self.hbm_gib * GIB

    def tier(self, name: str) -> LinkTier:
        """The link tier called ``name`` ('intra_node', 'inter_node' or 'inter_group')."""
        if name not in ("intra_node", "inter_node", "inter_group"):
            raise ValueError(f"unknown link tier {name!r}; known: intra_node, inter_node, inter_group")
        return getattr(self, name)

    def node_of(self, rank: int) -> int:
        """Node index of a global rank (ranks fill nodes in order)."""
        return rank // self.gpus_per_node

    def group_of(self, rank: int) -> int:
        """Switch-group index of a global rank."""
        return 0 if self.nodes_per_group is None else self.node_of(rank) // self.nodes_per_group

    def tier_between(self, a: int, b: int) -> str:
        """Name of the slowest tier a message between global ranks ``a`` and ``b`` crosses."""
        if self.node_of(a) == self.node_of(b):
            return "intra_node"
        return "inter_node" if self.group_of(a) == self.group_of(b) else "inter_group"

    @classmethod
    def preset(cls, name: str, **overrides) -> "ClusterSpec":
        """A cluster preset by name (see :data:`CLUSTERS`), with fields overridden."""
        if name not in CLUSTERS:
            raise ValueError(f"unknown cluster preset {name!r}; known: {sorted(CLUSTERS)}")
        return cls(**{**CLUSTERS[name].model_dump(), **overrides})


def _tier(bw: float, lat: float, peer: float = 0.0) -> LinkTier:
    return LinkTier(bw_gbps=bw, latency_us=lat, per_peer_us=peer)


#: Cluster presets. Numbers from datasheets and our own 4x H200 measurements; the latencies
#: are fitted to the measured NCCL all-to-all curve (50 us at 1 MiB per rank on 4 H200s) or assumed.
CLUSTERS: Dict[str, ClusterSpec] = {
    "h200-nvlink-ib400": ClusterSpec(
        name="h200-nvlink-ib400", gpus_per_node=8, hbm_gib=139.8, peak_tflops=989.5, gemm_efficiency=0.68,
        hbm_tbps=4.2, intra_node=_tier(335.0, 45.0, 1.0), inter_node=_tier(46.0, 20.0, 2.0),
        inter_group=_tier(46.0, 30.0, 3.0)),
    "h100-nvlink-ib400": ClusterSpec(
        name="h100-nvlink-ib400", gpus_per_node=8, hbm_gib=79.1, peak_tflops=989.5, gemm_efficiency=0.66,
        hbm_tbps=3.0, intra_node=_tier(335.0, 45.0, 1.0), inter_node=_tier(46.0, 20.0, 2.0),
        inter_group=_tier(46.0, 30.0, 3.0)),
    # Frontier: 8 MI250X GCDs per node, 4x 25 GB/s Slingshot NICs per node (12.5 GB/s per GCD), dragonfly
    # groups of 128 nodes with tapered global links; Infinity Fabric between GCDs ~50 GB/s per direction.
    "mi250x-frontier": ClusterSpec(
        name="mi250x-frontier", gpus_per_node=8, hbm_gib=63.98, peak_tflops=191.5, gemm_efficiency=0.60,
        hbm_tbps=1.3, intra_node=_tier(50.0, 40.0, 2.0), inter_node=_tier(12.5, 25.0, 4.0),
        inter_group=_tier(8.0, 40.0, 6.0), nodes_per_group=128),
}
