"""Communication model: alpha-beta costs of MoE all-to-all (flat, hierarchical), pipeline p2p and ZeRO/DP
collectives, on the rank placement of :mod:`piper_ds.system.layout`.

All times in seconds, sizes in bytes, per GPU. Tiers run in parallel (NVLink and the NIC are separate links),
so a flat all-to-all costs the slowest tier's share, not the sum.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, List, Sequence

from piper_ds.planner.cluster import ClusterSpec
from piper_ds.planner.profile import PlatformProfile
from piper_ds.system.layout import Layout

TIERS = ("intra_node", "inter_node", "inter_group")


def ep_group(layout: Layout, stage: int = 0, index: int = 0) -> List[int]:
    """Global ranks of EP group ``index`` of pipeline ``stage`` (ep consecutive ranks of the stage's DP group)."""
    base = stage * layout.dp + index * layout.ep
    return list(range(base, base + layout.ep))


def dp_group(layout: Layout, stage: int = 0) -> List[int]:
    """Global ranks of the data-parallel group of ``stage``."""
    return list(range(stage * layout.dp, (stage + 1) * layout.dp))


def edp_group(layout: Layout, stage: int = 0, slot: int = 0) -> List[int]:
    """Global ranks holding the same experts (expert-data-parallel group) in ``stage``."""
    return [stage * layout.dp + slot + j * layout.ep for j in range(layout.edp)]


def peers_by_tier(cluster: ClusterSpec, ranks: Sequence[int], me: int) -> Dict[str, int]:
    """How many of ``ranks`` (other than ``me``) sit behind each tier as seen from ``me``."""
    out = {t: 0 for t in TIERS}
    for r in ranks:
        if r != me:
            out[cluster.tier_between(me, r)] += 1
    return out


def _distinct_views(cluster: ClusterSpec, ranks: Sequence[int]) -> List[Dict[str, int]]:
    """peers_by_tier for one member per node of the group (members of one node see the same counts)."""
    per_node = Counter(cluster.node_of(r) for r in ranks)
    first = {}
    for r in ranks:
        first.setdefault(cluster.node_of(r), r)
    views = []
    for node, me in first.items():
        view = {t: 0 for t in TIERS}
        for other, count in per_node.items():
            view[cluster.tier_between(me, first[other])] += count - (1 if other == node else 0)
        views.append(view)
    return views


def slowest_tier(cluster: ClusterSpec, ranks: Sequence[int]) -> str:
    """The slowest tier any two ranks of a group talk over ('intra_node' for a group of one).

    Nodes and switch groups are filled in rank order, so the extreme ranks decide it.
    """
    return cluster.tier_between(min(ranks), max(ranks))


def alltoall_seconds(cluster: ClusterSpec, profile: PlatformProfile, layout: Layout, tokens: float, k: int,
                     row_bytes: float) -> Dict[str, float]:
    """One MoE all-to-all (dispatch or combine) of ``tokens`` tokens per GPU, rows of ``row_bytes``.

    Returns {'seconds', 'bytes_out', plus bytes per tier}. Uniform routing with the busiest rank carrying
    ``profile.load_imbalance`` x the mean. Flat: a token goes once to each distinct destination rank.
    Hierarchical (layout.a2a == 'hierarchical' and the group spans nodes): Phase I intra-node exchange in
    parallel with Phase II packed inter-node exchange (a token crosses to each destination node once), then
    Phase III intra-node redistribution.
    """
    ranks = ep_group(layout)
    if layout.ep == 1 or tokens <= 0:
        return {"seconds": 0.0, "bytes_out": 0.0, **{t: 0.0 for t in TIERS}}
    p_rank = 1.0 - (1.0 - 1.0 / layout.ep) ** k  # chance a token visits one given other rank
    scale = tokens * row_bytes * profile.load_imbalance
    nodes = sorted({cluster.node_of(r) for r in ranks})
    if layout.a2a == "hierarchical" and len(nodes) > 1:
        return _hierarchical(cluster, profile, ranks, len(nodes), k, p_rank, scale)
    worst = {"seconds": 0.0}
    for peers in _distinct_views(cluster, ranks):
        by_tier = {t: scale * p_rank * n for t, n in peers.items()}
        secs = max(profile.tier(cluster, t).seconds(b, peers[t]) for t, b in by_tier.items())
        if secs >= worst["seconds"]:
            worst = {"seconds": secs, "bytes_out": sum(by_tier.values()), **by_tier}
    return worst


def _hierarchical(cluster: ClusterSpec, profile: PlatformProfile, ranks: Sequence[int], n_nodes: int, k: int,
                  p_rank: float, scale: float) -> Dict[str, float]:
    local = len(ranks) // n_nodes  # ranks of the group per node
    p_node = 1.0 - (1.0 - 1.0 / n_nodes) ** k  # chance a token visits one given other node
    far = "inter_group" if slowest_tier(cluster, ranks) == "inter_group" else "inter_node"
    intra, inter = profile.tier(cluster, "intra_node"), profile.tier(cluster, far)
    off_rows = p_node * (n_nodes - 1)  # rows per token leaving the node (once per destination node)
    phase1 = intra.seconds(scale * (p_rank * (local - 1) + off_rows * (local - 1) / local), local - 1)
    phase2 = inter.seconds(scale * off_rows, n_nodes - 1)
    phase3 = intra.seconds(scale * p_rank * (n_nodes - 1) * (local - 1), local - 1)
    return {"seconds": max(phase1, phase2) + phase3, "bytes_out": scale * (p_rank * (local - 1) + off_rows),
            "intra_node": scale * p_rank * (local - 1), "inter_node": scale * off_rows if far == "inter_node"
            else 0.0, "inter_group": scale * off_rows if far == "inter_group" else 0.0}


def p2p_seconds(cluster: ClusterSpec, profile: PlatformProfile, layout: Layout, stage: int,
                nbytes: float) -> float:
    """Send ``nbytes`` from every rank of ``stage`` to its peer in ``stage+1`` (worst pair), seconds."""
    if layout.pp == 1 or stage >= layout.pp - 1:
        return 0.0
    worst = 0.0
    # the pair pattern repeats every node; sample two nodes' worth and the last pair
    for j in sorted(set(range(min(layout.dp, 2 * cluster.gpus_per_node))) | {layout.dp - 1}):
        a, b = stage * layout.dp + j, (stage + 1) * layout.dp + j
        worst = max(worst, profile.p2p_tier(cluster, cluster.tier_between(a, b)).seconds(nbytes))
    return worst


def _ring(cluster: ClusterSpec, profile: PlatformProfile, ranks: Sequence[int], nbytes: float,
          passes: float) -> float:
    n = len(ranks)
    if n <= 1 or nbytes <= 0:
        return 0.0
    tier = profile.tier(cluster, slowest_tier(cluster, ranks))
    lat = tier.latency_us * 1e-6 * 2 * math.ceil(math.log2(n))
    return lat + passes * (n - 1) / n * nbytes / (tier.bw_gbps * 1e9)


def allreduce_seconds(cluster: ClusterSpec, profile: PlatformProfile, ranks: Sequence[int], nbytes: float) -> float:
    """Ring all-reduce of ``nbytes`` per rank over ``ranks``: 2(n-1)/n * bytes / bw + latency."""
    return _ring(cluster, profile, ranks, nbytes, 2.0)


def reduce_scatter_seconds(cluster: ClusterSpec, profile: PlatformProfile, ranks: Sequence[int],
                           nbytes: float) -> float:
    """Ring reduce-scatter of ``nbytes`` (full size) per rank: (n-1)/n * bytes / bw + latency."""
    return _ring(cluster, profile, ranks, nbytes, 1.0)


def allgather_seconds(cluster: ClusterSpec, profile: PlatformProfile, ranks: Sequence[int], nbytes: float) -> float:
    """Ring all-gather producing ``nbytes`` (full size) per rank: (n-1)/n * bytes / bw + latency."""
    return _ring(cluster, profile, ranks, nbytes, 1.0)
