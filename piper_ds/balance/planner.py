"""The migration planner: from one window's expert loads, which experts of a MoE layer swap EP ranks.

Pure Python on integer loads, so every rank that holds the layer computes the same plan from the same
all-reduced counts (the controller all-reduces them first). Two steps:

1. :func:`greedy_swaps` — the Piper paper's greedy rule (section VI-A): take the most-loaded EP rank and the
   least-loaded one (ties: the lower rank), and among the pairs (expert a on the hot rank, expert b on the cold
   one) swap the pair whose larger new rank load ``max(H - d, C + d)`` is smallest, where
   ``d = load[a] - load[b]`` (ties: the smaller (a, b) ids). Only swaps that lower the hot rank's load below
   its old value are taken; each one strictly lowers the sum of squared rank loads, so the loop ends. An
   expert moves at most once per plan, so the swaps are independent of the order they run in. Stops at
   ``max_swaps`` or when no pair helps (a balanced layer, a single rank).
2. :func:`plan_layer` — keeps the prefix of those swaps whose predicted saving over the next window most
   exceeds its cost (:mod:`piper_ds.system.migration`: the layer's time scales with its max rank load; the
   cost is the experts the busiest sender sends, over the point-to-point bandwidth), and nothing when the
   layer's max/mean rank load is at most the threshold or no prefix pays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

from piper_ds.system.migration import migration_saving_seconds, transfer_seconds

Swap = Tuple[int, int]


def rank_loads(expert_loads: Sequence[int], rank_of: Sequence[int], ep_size: int) -> List[int]:
    """Load of each of the ``ep_size`` EP ranks: the sum of the loads of the experts ``rank_of`` puts there."""
    if len(expert_loads) != len(rank_of):
        raise ValueError(f"{len(expert_loads)} expert loads for a placement of {len(rank_of)} experts")
    out = [0] * ep_size
    for load, rank in zip(expert_loads, rank_of):
        if not 0 <= rank < ep_size:
            raise ValueError(f"placement names EP rank {rank}, outside [0, {ep_size})")
        out[rank] += int(load)
    return out


def max_over_mean(loads: Sequence[int]) -> float:
    """max(loads) / mean(loads): 1.0 = balanced (also when nothing was counted)."""
    total = sum(loads)
    return 1.0 if total == 0 else max(loads) * len(loads) / total


@dataclass(frozen=True)
class SwapPlan:
    """Greedy swaps of one layer and the rank loads after each: ``rank_loads[k]`` holds the loads after the first
    ``k`` swaps (``rank_loads[0]``: before any), ``senders[k]`` the EP ranks that send an expert in swap k."""

    swaps: Tuple[Swap, ...]
    rank_loads: Tuple[Tuple[int, ...], ...]
    senders: Tuple[Tuple[int, int], ...]


def greedy_swaps(expert_loads: Sequence[int], rank_of: Sequence[int], ep_size: int, max_swaps: int) -> SwapPlan:
    """The greedy swaps (module docstring, step 1) for one layer: ``expert_loads`` [E] (tokens per global expert
    id over the window, ints >= 0), ``rank_of`` [E] (the EP rank of each expert now), at most ``max_swaps``."""
    if ep_size < 1 or max_swaps < 0:
        raise ValueError(f"need ep_size >= 1 and max_swaps >= 0, got ep_size {ep_size}, max_swaps {max_swaps}")
    if any(int(x) < 0 for x in expert_loads):
        raise ValueError(f"expert loads must be >= 0, got {list(expert_loads)}")
    loads = [int(x) for x in expert_loads]
    owner = [int(r) for r in rank_of]
    ranks = rank_loads(loads, owner, ep_size)
    moved: set = set()
    swaps: List[Swap] = []
    history = [tuple(ranks)]
    senders: List[Tuple[int, int]] = []
    while len(swaps) < max_swaps and ep_size > 1:
        hot = min(range(ep_size), key=lambda r: (-ranks[r], r))
        cold = min(range(ep_size), key=lambda r: (ranks[r], r))
        best = _best_pair(loads, owner, moved, hot, cold, ranks[hot], ranks[cold])
        if best is None:
            break
        a, b = best
        d = loads[a] - loads[b]
        ranks[hot], ranks[cold] = ranks[hot] - d, ranks[cold] + d
        owner[a], owner[b] = cold, hot
        moved.update((a, b))
        swaps.append((a, b))
        senders.append((hot, cold))
        history.append(tuple(ranks))
    return SwapPlan(tuple(swaps), tuple(history), tuple(senders))


def _best_pair(loads: List[int], owner: List[int], moved: set, hot: int, cold: int, load_hot: int,
               load_cold: int):
    """(a on ``hot``, b on ``cold``) minimising (new max of the two ranks, a, b), if it lowers the hot rank."""
    best_key = None
    on_hot = [e for e, r in enumerate(owner) if r == hot and e not in moved]
    on_cold = [e for e, r in enumerate(owner) if r == cold and e not in moved]
    for a in on_hot:
        for b in on_cold:
            d = loads[a] - loads[b]
            if d <= 0:
                continue
            key = (max(load_hot - d, load_cold + d), a, b)
            if key[0] < load_hot and (best_key is None or key < best_key):
                best_key = key
    return None if best_key is None else best_key[1:]


@dataclass(frozen=True)
class LayerPlan:
    """What to do with one layer: ``swaps`` (pairs of global expert ids, possibly none), the max/mean rank load
    before and predicted after, and the predicted saving and cost (seconds) of the chosen swaps."""

    swaps: Tuple[Swap, ...]
    ratio_before: float
    ratio_after: float
    saving_s: float
    cost_s: float


def plan_layer(expert_loads: Sequence[int], rank_of: Sequence[int], ep_size: int, *, max_swaps: int,
               threshold: float, layer_seconds: float, window: int, bytes_per_expert: int,
               p2p_gbps: float) -> LayerPlan:
    """The swaps worth making in one layer (module docstring, step 2).

    ``layer_seconds``: the layer's routed-expert time per step as measured (at the current imbalance);
    ``window``: the steps over which the saving is counted (the next window); ``bytes_per_expert``: what one
    rank sends per migrated expert; ``p2p_gbps``: the point-to-point bandwidth. The cost of k swaps is the
    experts sent by the rank that sends the most, times ``bytes_per_expert``, over the bandwidth. Among the
    greedy prefixes the one with the largest saving - cost is kept (ties: the shorter); none when that is <= 0
    or the ratio before is <= ``threshold``.
    """
    greedy = greedy_swaps(expert_loads, rank_of, ep_size, max_swaps)
    before = max_over_mean(greedy.rank_loads[0])
    none = LayerPlan((), before, before, 0.0, 0.0)
    if before <= threshold:
        return none
    best, best_net = none, 0.0
    sent = [0] * ep_size
    for k, (hot, cold) in enumerate(greedy.senders, start=1):
        sent[hot] += 1
        sent[cold] += 1
        after = max_over_mean(greedy.rank_loads[k])
        saving = migration_saving_seconds(before, after, layer_seconds, window)
        cost = transfer_seconds(max(sent) * bytes_per_expert, p2p_gbps)
        if saving - cost > best_net:
            best, best_net = LayerPlan(greedy.swaps[:k], before, after, saving, cost), saving - cost
    return best
