"""Platform profile: achieved rates the resource model uses, measured by ``python -m piper_ds.bench.calibrate``.

Every field is optional: what is missing falls back to defaults derived from the :class:`ClusterSpec` and the
measurements (ours, on H200s). The grouped-GEMM default curve is expressed as a fraction of the dense GEMM rate
against rows (tokens) per expert: the points at 768 and 8192 rows are our measurements on one H200
(546/673 and 618/677); the points below 768 are an assumed fall-off until calibrated.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field

from piper_ds.planner.cluster import ClusterSpec, LinkTier
from piper_ds.system.activations import DEFAULT_LOAD_IMBALANCE

#: (rows per expert, grouped rate / dense rate) - see the module docstring.
DEFAULT_GROUPED_SHAPE: Tuple[Tuple[float, float], ...] = (
    (1, 0.005), (16, 0.08), (64, 0.28), (128, 0.45), (256, 0.62), (512, 0.74), (768, 0.80), (2048, 0.86),
    (8192, 0.91))


def interp_log(points: List[Tuple[float, float]], x: float) -> float:
    """Piecewise-linear interpolation in log2(x) through sorted ``(x, y)`` points, clamped at the ends."""
    if not points:
        raise ValueError("interp_log needs at least one point")
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1] * max(x, 0.0) / pts[0][0]  # towards 0 below the first point
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + t * (y1 - y0)
    return pts[-1][1]  # unreachable


class PlatformProfile(BaseModel):
    """Achieved rates and overheads of one platform; None = derive from the cluster spec."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field("defaults", description="What produced the profile (machine, date) or 'defaults'.")
    dense_tflops: Optional[float] = Field(
        None, gt=0, description="Dense bf16 GEMM rate, TFLOP/s; None = peak * gemm_efficiency.")
    grouped_gemm: Optional[List[Tuple[float, float]]] = Field(
        None, description="Grouped GEMM (rows per expert, TFLOP/s) points; None = default shape x dense rate.")
    attention_tflops: Optional[float] = Field(
        None, gt=0, description="Causal attention fwd+bwd rate, TFLOP/s; None = attention_fraction x dense.")
    attention_fraction: float = Field(0.65, gt=0, le=1.5, description="Attention rate / dense rate default.")
    hbm_tbps: Optional[float] = Field(
        None, gt=0, description="Measured device-copy bandwidth, TB/s (read + write); None = the cluster's.")
    hbm_efficiency: float = Field(0.7, gt=0, le=1, description="Elementwise-kernel share of the HBM bandwidth.")
    tiers: Dict[str, LinkTier] = Field(
        default_factory=dict, description="Measured all-to-all/collective link tiers overriding the cluster's.")
    p2p_tiers: Dict[str, LinkTier] = Field(
        default_factory=dict, description="Measured point-to-point link tiers (pipeline sends); default = tiers.")
    measurements: Dict[str, Any] = Field(
        default_factory=dict, description="Raw calibration tables (for the record; the model reads the fits).")
    dense_layer_overhead_us: float = Field(
        60.0, ge=0, description="Launch/host overhead of one dense block, fwd+bwd, microseconds.")
    moe_layer_overhead_us: float = Field(
        250.0, ge=0, description="Launch/host-sync overhead of one MoE block, fwd+bwd, microseconds (the fixed "
        "part; python -m piper_ds.bench.calibrate measures it).")
    moe_overhead_ns_per_row: float = Field(
        0.0, ge=0, description="Overhead of one MoE block per routed row (token x top_k) on the busiest EP rank, "
        "fwd+bwd, nanoseconds: routing plans and row permutations that scale with the rows (0 = fixed only).")
    load_imbalance: float = Field(
        DEFAULT_LOAD_IMBALANCE, ge=1,
        description="Rows on the busiest EP rank / mean (routing skew; sizes buffers and time).")
    overlap_efficiency: float = Field(
        0.8, ge=0, le=1, description="Share of a block's compute that can hide all-to-all with overlap_a2a.")
    grad_sync_overlap: float = Field(
        0.5, ge=0, le=1, description="Share of the gradient reduction hidden under backward (no-PP ZeRO-1/2).")
    optimizer_ns_per_param: Optional[float] = Field(
        None, gt=0, description="Measured seconds (ns) of one bf16 ZeRO-1 engine.step() per parameter the rank "
        "updates, of the step named by optimizer_step (python -m piper_ds.bench.calibrate); used only for layouts "
        "that run that step; None: the analytic HBM-bytes model.")
    optimizer_step: Literal["deepspeed", "fused"] = Field(
        "deepspeed", description="The ZeRO step optimizer_ns_per_param timed: 'fused' (the engines' fused step, "
        "what calibration measures) or 'deepspeed' (DeepSpeed's own step with torch's fused AdamW; profiles "
        "written before this field existed timed that one).")
    fragmentation: float = Field(0.08, ge=0, le=1, description="Allocator fragmentation, share of dynamic memory.")
    workspace_gib: float = Field(1.0, ge=0, description="cuBLAS/NCCL workspaces and context tensors, GiB.")
    attention_saves_scores: bool = Field(
        False, description="Attention keeps the s x s scores (math SDPA, e.g. on CPU); False = flash/efficient.")

    def moe_overhead_seconds(self, rows: float) -> float:
        """Overhead of one MoE block, fwd+bwd, seconds: the fixed part + the per-row part for ``rows`` routed
        rows (token x top_k, busiest rank)."""
        return self.moe_layer_overhead_us * 1e-6 + self.moe_overhead_ns_per_row * 1e-9 * rows

    def imbalance(self, ep: int) -> float:
        """Busiest-rank / mean rows for an EP group of ``ep`` ranks (1 without EP: one rank has them all)."""
        return 1.0 if ep == 1 else self.load_imbalance

    # ---- resolved rates -----------------------------------------------------------------------------
    def dense_rate(self, cluster: ClusterSpec) -> float:
        """Dense GEMM rate in FLOP/s."""
        tf = self.dense_tflops if self.dense_tflops is not None else cluster.peak_tflops * cluster.gemm_efficiency
        return tf * 1e12

    def grouped_rate(self, cluster: ClusterSpec, rows_per_expert: float) -> float:
        """Grouped GEMM rate in FLOP/s at ``rows_per_expert`` rows per local expert."""
        if rows_per_expert <= 0:
            raise ValueError(f"rows_per_expert ({rows_per_expert}) must be > 0")
        if self.grouped_gemm:
            return interp_log([(float(a), float(b)) for a, b in self.grouped_gemm], rows_per_expert) * 1e12
        return interp_log(list(DEFAULT_GROUPED_SHAPE), rows_per_expert) * self.dense_rate(cluster)

    def attention_rate(self, cluster: ClusterSpec) -> float:
        """Causal attention core rate in FLOP/s."""
        if self.attention_tflops is not None:
            return self.attention_tflops * 1e12
        return self.attention_fraction * self.dense_rate(cluster)

    def hbm_rate(self, cluster: ClusterSpec) -> float:
        """Achieved HBM bandwidth for memory-bound ops, bytes/s."""
        return (self.hbm_tbps or cluster.hbm_tbps) * 1e12 * self.hbm_efficiency

    def tier(self, cluster: ClusterSpec, name: str) -> LinkTier:
        """A link tier: measured if the profile has it, else the cluster's."""
        return self.tiers.get(name) or cluster.tier(name)

    def p2p_tier(self, cluster: ClusterSpec, name: str) -> LinkTier:
        """A link tier for point-to-point sends: measured p2p, else :meth:`tier`."""
        return self.p2p_tiers.get(name) or self.tier(cluster, name)

    # ---- files --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> "PlatformProfile":
        """Reads a profile JSON written by ``python -m piper_ds.bench.calibrate``."""
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise TypeError(f"profile {path} must hold a JSON object, got {type(data).__name__}")
        return cls(**data)

    def save(self, path: str) -> None:
        """Writes the profile as JSON."""
        with open(path, "w") as f:
            json.dump(self.model_dump(mode="json"), f, indent=2)
            f.write("\n")
