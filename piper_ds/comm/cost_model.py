"""α-β communication costs per network tier, fitted from measurements; flat vs hierarchical all-to-all time.

The planner's hook: ``fit_tiers({"intra": [(bytes, seconds), ...], "inter": [...]})`` turns measured
point-to-point (or per-message) times into one :class:`AlphaBeta` per tier — t(n) = α + β·n — and
:func:`alltoall_time` predicts an uneven-free (balanced) all-to-all of ``bytes_per_rank`` over N nodes × L
ranks with either transport. ``python -m piper_ds.bench.alltoall --tiers`` measures the points and writes the
fits into its JSON (``"tiers"``), so a planner reads them without re-fitting.

The all-to-all model (per rank, s = bytes_per_rank / (N·L) bytes per peer, messages to distinct peers
overlap within a phase; each rank owns one NIC, as on rail-optimised clusters):

* flat: ``max(intra: (L-1)·(α_i + s·β_i), inter: (N-1)·L·α_e + (N-1)·L·s·β_e)`` — every inter-node message
  pays its own latency on the NIC;
* hierarchical: ``lane round + max(Phase I, Phase II) + Phase III`` with Phase I = (L-1)·(α_i + s·β_i),
  Phase II = (N-1)·(α_e + L·s·β_e) (one packed message per remote node), Phase III = (L-1)·(α_i +
  (N-1)·s·β_i) and the lane round (L-1)·α_i when N, L > 1 (0 with a precomputed plan).

Both move the same inter-node bytes; the hierarchical one sends L times fewer, L times larger inter-node
messages, and pays an extra intra-node hop. It wins when α_e·(N-1)·(L-1) outweighs that hop — large N, small
messages. Congestion, incast and the NIC's message rate limit are not modelled.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Sequence, Tuple

Point = Tuple[float, float]  # (bytes, seconds)


@dataclass(frozen=True)
class AlphaBeta:
    """t(n) = alpha_s + beta_s_per_byte · n for one message of n bytes on one tier."""

    alpha_s: float
    beta_s_per_byte: float

    def time(self, nbytes: float) -> float:
        """Seconds to move one message of ``nbytes``."""
        return self.alpha_s + self.beta_s_per_byte * nbytes

    @property
    def bandwidth_GBps(self) -> float:
        """Asymptotic bandwidth 1/β in GB/s (1e9 bytes); inf for β = 0."""
        return float("inf") if self.beta_s_per_byte == 0 else 1e-9 / self.beta_s_per_byte

    def to_dict(self) -> Dict[str, float]:
        """Plain floats for JSON (bandwidth None when β = 0)."""
        bw = self.bandwidth_GBps
        return {**asdict(self), "alpha_us": self.alpha_s * 1e6, "bandwidth_GBps": None if bw == float("inf") else bw}


def fit_alpha_beta(points: Sequence[Point]) -> AlphaBeta:
    """Least-squares α, β ≥ 0 through (bytes, seconds) points.

    Relative residuals are minimised (each point weighted by 1/t), so the latency of small messages is not
    drowned by the large ones. If the unconstrained fit gives α < 0 (or β < 0), that parameter is fixed to 0
    and the other re-fitted — a constraint of the model, not a correction of the data.
    """
    pts = [(float(n), float(t)) for n, t in points]
    if len(pts) < 2 or len({n for n, _ in pts}) < 2:
        raise ValueError(f"need points at two or more sizes to fit alpha and beta, got {pts}")
    if any(n < 0 or t <= 0 for n, t in pts):
        raise ValueError(f"sizes must be >= 0 and times > 0, got {pts}")
    w = [1.0 / t for _, t in pts]
    # weighted normal equations of t = a + b n
    s0 = sum(wi * wi for wi in w)
    s1 = sum(wi * wi * n for wi, (n, _) in zip(w, pts))
    s2 = sum(wi * wi * n * n for wi, (n, _) in zip(w, pts))
    y0 = sum(wi * wi * t for wi, (_, t) in zip(w, pts))
    y1 = sum(wi * wi * n * t for wi, (n, t) in zip(w, pts))
    det = s0 * s2 - s1 * s1
    a = (y0 * s2 - y1 * s1) / det
    b = (s0 * y1 - s1 * y0) / det
    if a < 0:
        a, b = 0.0, y1 / s2
    if b < 0:
        a, b = y0 / s0, 0.0
    return AlphaBeta(a, b)


def fit_tiers(points_by_tier: Mapping[str, Sequence[Point]]) -> Dict[str, AlphaBeta]:
    """One :class:`AlphaBeta` per tier name (e.g. "intra", "inter") from its measured points."""
    return {tier: fit_alpha_beta(pts) for tier, pts in points_by_tier.items()}


def alltoall_time(kind: str, bytes_per_rank: float, nodes: int, gpus_per_node: int, intra: AlphaBeta,
                  inter: AlphaBeta, planned: bool = False) -> float:
    """Predicted seconds of a balanced all-to-all of ``bytes_per_rank`` ('flat' or 'hierarchical').

    ``planned``: the hierarchical lane counts came with the counts exchange (``transport.plan``), so there
    is no lane round. See the module docstring for the formulas.
    """
    if kind not in ("flat", "hierarchical"):
        raise ValueError(f"kind must be 'flat' or 'hierarchical', got {kind!r}")
    if nodes < 1 or gpus_per_node < 1 or bytes_per_rank < 0:
        raise ValueError(f"nodes ({nodes}) and gpus_per_node ({gpus_per_node}) must be >= 1 and bytes_per_rank "
                         f"({bytes_per_rank}) >= 0")
    N, L = nodes, gpus_per_node
    s = bytes_per_rank / (N * L)
    phase1 = (L - 1) * intra.time(s)
    if kind == "flat":
        return max(phase1, (N - 1) * L * inter.time(s))
    if N == 1:
        return phase1
    phase2 = (N - 1) * inter.time(L * s)
    phase3 = (L - 1) * intra.time((N - 1) * s)
    lane_round = 0.0 if planned or L == 1 else (L - 1) * intra.alpha_s
    return lane_round + max(phase1, phase2) + phase3
