"""Per-block overheads: the resource model's block time with its overhead terms at zero, and the fit of
measured - predicted residuals to the profile's overhead fields.

The resource model (:func:`piper_ds.planner.resources._block_time`) prices a block's GEMMs, attention core,
elementwise traffic and all-to-alls from measured rates, and adds an *overhead* for everything else a block
costs (kernel launches, host synchronisations, routing plans, row permutations):

* dense block: ``dense_layer_overhead_us`` (a constant);
* MoE block: ``moe_layer_overhead_us + moe_overhead_ns_per_row x rows``, with ``rows`` = tokens x top_k x the
  load imbalance of the busiest EP rank (at ep 1: tokens x top_k).

``python -m piper_ds.bench.calibrate`` times real blocks at several micro-batches and calls :func:`fit_overhead`
on the residuals (measured - :func:`block_prediction`), so the subtraction uses exactly the model that later
predicts. A residual below zero means the rates alone already over-predict: it is recorded and the overhead
set to 0 with a warning, never clamped silently.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

from piper_ds.planner.cluster import ClusterSpec
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.resources import STAGE_PARTS, _block_time
from piper_ds.system.layout import Layout
from piper_ds.system.specs import ModelSpec

OVERHEAD_FIELDS = {"moe_layer_overhead_us": 0.0, "moe_overhead_ns_per_row": 0.0, "dense_layer_overhead_us": 0.0}


def without_overheads(profile: PlatformProfile) -> PlatformProfile:
    """``profile`` with every per-block overhead term at zero (the rates untouched)."""
    return profile.model_copy(update=OVERHEAD_FIELDS)


def block_layout(micro_batch: int, precision: str) -> Layout:
    """The one-GPU layout a calibration block runs in: dp 1, ep 1, ``micro_batch`` sequences."""
    return Layout(dp=1, ep=1, zero_stage=1, micro_batch=micro_batch, grad_accum=1, precision=precision)


def block_rows(model: ModelSpec, micro_batch: int) -> int:
    """Routed rows of one MoE block at ep 1: tokens x top_k (the per-row overhead's unit)."""
    return micro_batch * model.seq_len * model.top_k


def block_prediction(model: ModelSpec, cluster: ClusterSpec, profile: PlatformProfile, micro_batch: int,
                     moe: bool, precision: str = "bf16") -> Dict[str, float]:
    """Predicted forward + backward seconds of ONE block (attention + FFN or MoE) at ep 1, overheads at zero.

    Keys: the stage parts of the block (seconds; 'a2a' is 0 at ep 1) and 'total' (seconds, overhead-free).
    """
    parts = _block_time(model, cluster, block_layout(micro_batch, precision), without_overheads(profile), moe)
    out = {p: parts[p] for p in STAGE_PARTS}
    out["total"] = sum(out[p] for p in STAGE_PARTS if p != "overhead")
    return out


@dataclass
class OverheadFit:
    """``residual_s ~= fixed_us * 1e-6 + per_row_ns * 1e-9 * rows`` fitted to (rows, residual_s) points.

    ``raw_fixed_us`` / ``raw_per_row_ns`` are the unconstrained least-squares values; ``fixed_us`` and
    ``per_row_ns`` are what goes into the profile (>= 0); ``warnings`` say why they differ.
    """

    fixed_us: float
    per_row_ns: float
    raw_fixed_us: float
    raw_per_row_ns: float
    points: List[Tuple[float, float]]
    warnings: List[str] = field(default_factory=list)

    def seconds(self, rows: float) -> float:
        """The fitted overhead for ``rows`` routed rows, seconds."""
        return self.fixed_us * 1e-6 + self.per_row_ns * 1e-9 * rows

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready record (for the profile's ``measurements``)."""
        return asdict(self)


def _least_squares(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """(intercept s, slope s/row) of y over x; slope 0 when all x are equal."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def fit_overhead(points: Sequence[Tuple[float, float]], per_row: bool = True, label: str = "overhead") -> OverheadFit:
    """Fits ``(rows, residual seconds)`` points to a fixed part (+ a per-row part when ``per_row``).

    Rules, each leaving a warning in the result: a negative slope (noise, or work that does not grow with
    rows) -> fixed only, the mean residual; a negative intercept with a positive slope -> a line through the
    origin; a negative fixed-only value -> 0. Raises ValueError without points.
    """
    pts = [(float(x), float(y)) for x, y in points]
    if not pts:
        raise ValueError(f"{label}: fit_overhead needs at least one (rows, residual) point")
    warnings: List[str] = []
    a, b = _least_squares(pts) if per_row and len({x for x, _ in pts}) > 1 else (statistics.fmean(
        y for _, y in pts), 0.0)
    raw = (a * 1e6, b * 1e9)
    if b < 0:
        warnings.append(f"{label}: per-row slope {b * 1e9:.3g} ns/row < 0; fitted the fixed part only")
        a, b = statistics.fmean(y for _, y in pts), 0.0
    if a < 0 and b > 0:
        warnings.append(f"{label}: fixed part {a * 1e6:.1f} us < 0; fitted a line through the origin")
        a, b = 0.0, sum(x * y for x, y in pts) / sum(x * x for x, _ in pts)
        if b < 0:
            warnings.append(f"{label}: slope through the origin {b * 1e9:.3g} ns/row < 0; overhead set to 0")
            b = 0.0
    if a < 0:
        warnings.append(f"{label}: residual {a * 1e6:.1f} us < 0 (the rates alone over-predict the block); "
                        "overhead set to 0")
        a = 0.0
    return OverheadFit(fixed_us=a * 1e6, per_row_ns=b * 1e9, raw_fixed_us=raw[0], raw_per_row_ns=raw[1],
                       points=pts, warnings=warnings)


def apply_fits(profile: PlatformProfile, moe: OverheadFit, dense: OverheadFit) -> PlatformProfile:
    """``profile`` with the fitted MoE (fixed + per row) and dense (fixed) block overheads."""
    return profile.model_copy(update={"moe_layer_overhead_us": moe.fixed_us, "moe_overhead_ns_per_row": moe.per_row_ns,
                                      "dense_layer_overhead_us": dense.fixed_us})
