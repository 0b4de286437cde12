"""Projection of one MoE dispatch all-to-all to clusters of 8-GPU nodes: flat vs hierarchical, by the α-β model.

Model predictions, not measurements. Inputs:

* intra-node tier: :func:`piper_ds.comm.cost_model.fit_alpha_beta` through our NCCL ``all_to_all_single``
  on 2 H200s (NV18; :data:`piper_ds.bench.validation.MEASURED_A2A_FLAT_S`). With 2 ranks the cost model's
  flat time is one message of half the bytes per rank, so the points are (bytes per rank / 2, seconds);
* inter-node tier: one 400 Gb/s NIC per GPU (8 per node), 46 GB/s per NIC (the low end of the
  46-49 GB/s achievable); the per-message cost α_e is an ASSUMPTION (default 5 µs: the marginal cost of one
  more message in a batch of NCCL sends over InfiniBand), bracketed by 2 and 20 µs in the CSV and the figure.

Traffic: ``tokens`` tokens per GPU, each sent to ``top_k`` distinct ranks (the limit of ep·(1-(1-1/ep)^k) for
large EP groups; no node-level dedup), rows of ``d_model`` bf16 values: 8192 · 6 · 2048 · 2 B = 192 MiB per
rank for xmoe-small. The bytes per rank are held fixed as the group grows (a model with E ≥ ranks; xmoe-small
itself has 64 experts, so ep ≤ 64 = 8 nodes). Times are :func:`~piper_ds.comm.cost_model.alltoall_time` with
everything it leaves out (congestion, incast, adaptive routing, NIC message rate) left out here too.

``python -m piper_ds.bench.projection --out DIR`` writes ``alltoall_projection.csv`` and ``.png``.
"""
from __future__ import annotations

import argparse
import csv
import os
from typing import Dict, List, Optional, Sequence

from piper_ds.bench.validation import MEASURED_A2A_FLAT_S
from piper_ds.comm.cost_model import AlphaBeta, alltoall_time, fit_alpha_beta

NODES = (2, 4, 8, 16, 32, 64, 128, 256, 512)
GPUS_PER_NODE = 8
NIC_GBPS = 46.0  # GB/s (1e9 B/s) per 400 Gb/s NIC, one NIC per GPU
ALPHA_INTER_US = 5.0  # assumed per-message cost on the NIC tier, microseconds
ALPHA_BAND_US = (2.0, 20.0)  # assumed range for α_e


def intra_fit() -> AlphaBeta:
    """α-β of the intra-node tier, per message, from the 2-rank NCCL measurements (seconds, s/byte)."""
    return fit_alpha_beta([(nbytes / 2, secs) for nbytes, secs in MEASURED_A2A_FLAT_S.items()])


def inter_tier(alpha_us: float = ALPHA_INTER_US, nic_gbps: float = NIC_GBPS) -> AlphaBeta:
    """α-β of one GPU's NIC: ``alpha_us`` µs per message, ``nic_gbps`` GB/s."""
    if alpha_us < 0 or nic_gbps <= 0:
        raise ValueError(f"alpha_us ({alpha_us}) must be >= 0 and nic_gbps ({nic_gbps}) > 0")
    return AlphaBeta(alpha_us * 1e-6, 1.0 / (nic_gbps * 1e9))


def dispatch_bytes_per_rank(tokens: int = 8192, top_k: int = 6, d_model: int = 2048, elt_bytes: int = 2) -> int:
    """Bytes one rank sends in one dispatch: tokens · top_k rows of d_model values of ``elt_bytes`` bytes."""
    if min(tokens, top_k, d_model, elt_bytes) < 1:
        raise ValueError(f"tokens ({tokens}), top_k ({top_k}), d_model ({d_model}), elt_bytes ({elt_bytes}) must be >= 1")
    return tokens * top_k * d_model * elt_bytes


def project(bytes_per_rank: float, nodes: Sequence[int] = NODES, gpus_per_node: int = GPUS_PER_NODE,
            intra: Optional[AlphaBeta] = None, alpha_us: float = ALPHA_INTER_US, nic_gbps: float = NIC_GBPS,
            band_us: Sequence[float] = ALPHA_BAND_US) -> List[Dict[str, float]]:
    """One row per node count: predicted milliseconds of flat, hierarchical and planned hierarchical, the
    same at the ends of the α_e band, and the NIC bound (inter-node bytes of a rank over its NIC)."""
    intra = intra or intra_fit()
    rows = []
    for n in nodes:
        row: Dict[str, float] = {"nodes": n, "gpus": n * gpus_per_node, "bytes_per_rank": bytes_per_rank}
        for tag, a in [("", alpha_us)] + [(f"_a{b:g}us", b) for b in band_us]:
            inter = inter_tier(a, nic_gbps)
            row["flat_ms" + tag] = 1e3 * alltoall_time("flat", bytes_per_rank, n, gpus_per_node, intra, inter)
            row["hier_ms" + tag] = 1e3 * alltoall_time("hierarchical", bytes_per_rank, n, gpus_per_node, intra,
                                                       inter)
            row["hier_planned_ms" + tag] = 1e3 * alltoall_time("hierarchical", bytes_per_rank, n, gpus_per_node,
                                                               intra, inter, planned=True)
        row["nic_bound_ms"] = 1e3 * bytes_per_rank * (n - 1) / n / (nic_gbps * 1e9)
        row["flat_over_hier_planned"] = row["flat_ms"] / row["hier_planned_ms"]
        rows.append(row)
    return rows


def write_csv(rows: List[Dict[str, float]], path: str) -> None:
    """The rows as CSV (milliseconds to 4 decimals)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: List[Dict[str, float]], path: str, title: str) -> None:
    """Flat vs hierarchical against node count (log-log), α_e band shaded, NIC bound dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    band = [k[len("flat_ms"):] for k in rows[0] if k.startswith("flat_ms_a")]
    x = [r["nodes"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label, color in (("flat_ms", "flat (NCCL all_to_all)", "tab:red"),
                              ("hier_planned_ms", "hierarchical, planned", "tab:blue"),
                              ("hier_ms", "hierarchical, lane round", "tab:cyan")):
        ax.plot(x, [r[key] for r in rows], marker="o", ms=3, color=color, label=label)
        if len(band) == 2 and key != "hier_ms":
            lo, hi = ([r[key + b] for r in rows] for b in band)
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    ax.plot(x, [r["nic_bound_ms"] for r in rows], "k--", lw=1, label="NIC bytes / 46 GB/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nodes (8 H200 + 8x 400G NICs each)")
    ax.set_ylabel("predicted ms per dispatch")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m piper_ds.bench.projection", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for alltoall_projection.csv and .png")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per GPU (8192)")
    p.add_argument("--top-k", type=int, default=6, help="distinct destination ranks per token (6)")
    p.add_argument("--d-model", type=int, default=2048, help="row width, bf16 values (2048)")
    p.add_argument("--alpha-inter-us", type=float, default=ALPHA_INTER_US, help="assumed µs per NIC message (5)")
    p.add_argument("--nic-gbps", type=float, default=NIC_GBPS, help="GB/s per NIC, one per GPU (46)")
    p.add_argument("--no-plot", action="store_true", help="CSV only")
    args = p.parse_args(argv)
    nbytes = dispatch_bytes_per_rank(args.tokens, args.top_k, args.d_model)
    intra = intra_fit()
    rows = project(nbytes, intra=intra, alpha_us=args.alpha_inter_us, nic_gbps=args.nic_gbps)
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, "alltoall_projection.csv"))
    title = (f"model prediction: {nbytes / 2**20:.0f} MiB per rank; intra fitted to 2x H200 NCCL "
             f"(α {intra.alpha_s * 1e6:.0f} µs, {intra.bandwidth_GBps:.0f} GB/s);\ninter {args.nic_gbps:g} GB/s, "
             f"α {args.alpha_inter_us:g} µs assumed (band {ALPHA_BAND_US[0]:g}-{ALPHA_BAND_US[1]:g})")
    if not args.no_plot:
        plot(rows, os.path.join(args.out, "alltoall_projection.png"), title)
    print(title.replace("\n", " "))
    print(f"{'nodes':>6} {'GPUs':>6} {'flat ms':>9} {'hier ms':>9} {'planned ms':>10} {'NIC bound':>9} {'flat/planned':>12}")
    for r in rows:
        print(f"{r['nodes']:>6} {r['gpus']:>6} {r['flat_ms']:>9.3f} {r['hier_ms']:>9.3f} {r['hier_planned_ms']:>10.3f} "
              f"{r['nic_bound_ms']:>9.3f} {r['flat_over_hier_planned']:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
