"""Rules of DeepSpeed 0.19 that the planner predicts and the runtime follows, written once in pure Python.

Each mirrors a piece of DeepSpeed (named in its docstring) and is tested against it, so that the planner can
use it without importing DeepSpeed or torch:

* :data:`MOE_GROUP_MAX_NUMEL` and :func:`greedy_groups`: how
  ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer`` cuts the expert parameters
  into optimizer groups;
* :func:`partition_balanced`: ``deepspeed.runtime.utils.partition_balanced``, the cut of a sequence of layer
  weights into pipeline stages;
* :data:`MAX_ZERO_WITH_PP`: the highest ZeRO stage DeepSpeed's ``PipelineEngine`` accepts.
"""
from __future__ import annotations

import itertools
import math
from typing import List, Sequence

#: DeepSpeed's cap on the elements of one MoE optimizer group
#: (``split_params_into_different_moe_groups_for_optimizer``, ``max_group_size``).
MOE_GROUP_MAX_NUMEL = 178956971

#: DeepSpeed's PipelineEngine refuses ZeRO-2/3 (gradient partitioning) with pipeline parallelism.
MAX_ZERO_WITH_PP = 1


def greedy_groups(tensor_numels: Sequence[int], max_numel: int = MOE_GROUP_MAX_NUMEL) -> List[List[int]]:
    """DeepSpeed's cut of MoE optimizer groups: the indices of the tensors of each group, consecutive tensors up
    to ``max_numel`` elements per group, a larger tensor alone."""
    out: List[List[int]] = []
    size = 0
    for i, n in enumerate(tensor_numels):
        if out and size + n <= max_numel:
            out[-1].append(i)
            size += n
        else:
            out.append([i])
            size = n
    return out


def greedy_group_sizes(tensor_numels: Sequence[int], max_numel: int = MOE_GROUP_MAX_NUMEL) -> List[int]:
    """Elements of each optimizer group of :func:`greedy_groups`."""
    return [sum(tensor_numels[i] for i in group) for group in greedy_groups(tensor_numels, max_numel)]


def partition_uniform(num_items: int, num_parts: int) -> List[int]:
    """``deepspeed.runtime.utils.partition_uniform``: ``num_parts + 1`` bounds cutting ``num_items`` items into
    parts of equal size, the first parts one larger; with fewer items than parts, one item per part and empty
    parts at the end."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    size, residual = divmod(num_items, num_parts)
    return [p * size + min(p, residual) for p in range(num_parts + 1)]


def partition_balanced(weights: Sequence[float], num_parts: int) -> List[int]:
    """``deepspeed.runtime.utils.partition_balanced``: ``num_parts + 1`` bounds cutting ``weights`` into
    consecutive parts so that the spread (largest part sum - smallest) is minimal, by the same dynamic program
    and tie-breaking (the last candidate cut of equal cost wins) in the same float64 arithmetic, so both give
    the same bounds. Fewer weights than parts: :func:`partition_uniform`."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = math.inf
    prefix = [0.0] + list(itertools.accumulate(float(w) for w in weights))
    best_max = [[inf] * (m + 1) for _ in range(n + 1)]
    best_min = [[inf] * (m + 1) for _ in range(n + 1)]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    best_max[0][0] = cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                hi, lo = max(best_max[k][j - 1], part), min(best_min[k][j - 1], part)
                if cost[i][j] >= hi - lo:
                    cost[i][j], best_max[i][j], best_min[i][j], position[i][j] = hi - lo, hi, lo, k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    return parts[::-1]
