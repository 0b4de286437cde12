"""Load monitoring for expert migration: one window's tokens per expert, summed over the layer's replicas.

The counts come from the engine's :class:`~piper_ds.tracking.expert_load.ExpertLoadCounter` (its forward hook
also fills a window tally that only :meth:`~piper_ds.tracking.expert_load.ExpertLoadCounter.take_window_counts`
resets, so the metrics writer and the balance window never reset each other). Every rank counts the tokens
*it* routed to each of the E experts; summed over all ranks that hold the layer (its data-parallel replicas:
the world at pp = 1, the stage's ranks at pp > 1) that is the layer's load per expert. Each EP group of the
stage holds the experts in the same placement, so the load of an EP rank is the sum of its experts' loads
(:func:`piper_ds.balance.planner.rank_loads`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from piper_ds.balance.planner import max_over_mean, rank_loads


@dataclass(frozen=True)
class WindowLoads:
    """One window, identical on every rank of the reducing group: ``expert_loads[l][e]`` tokens routed to global
    expert e of layer l over the window (ints, summed over the group), and ``step_seconds``, the wall time per
    optimizer step over the window (mean over the group's ranks)."""

    expert_loads: Tuple[Tuple[int, ...], ...]
    step_seconds: float


@torch.no_grad()
def reduce_window(counts: Sequence[Optional[torch.Tensor]], num_experts: Sequence[int], seconds: float, steps: int,
                  group=None, device=None) -> WindowLoads:
    """Sums this rank's window ``counts`` (per layer int64 [E_l] or None: no token counted) over ``group``
    (None: the world), with the window's wall ``seconds`` over ``steps`` optimizer steps; a collective: every
    rank of ``group`` calls it with the same layers. The seconds travel as integer microseconds in the same
    all-reduce, so every rank gets the same loads and the same step time bit for bit (the plans that follow
    must agree)."""
    if len(counts) != len(num_experts):
        raise ValueError(f"{len(counts)} count rows for {len(num_experts)} layers")
    if steps < 1 or seconds < 0:
        raise ValueError(f"need steps >= 1 and seconds >= 0, got steps={steps}, seconds={seconds}")
    if device is None:
        device = next((c.device for c in counts if c is not None), torch.device("cpu"))
    rows = []
    for c, e in zip(counts, num_experts):
        if c is not None and c.numel() != e:
            raise ValueError(f"a layer of {e} experts counted {c.numel()} entries")
        rows.append(torch.zeros(e, dtype=torch.int64, device=device) if c is None else c.to(device, torch.int64))
    micros = torch.tensor([round(seconds * 1e6)], dtype=torch.int64, device=device)
    flat = torch.cat(rows + [micros])
    ranks = 1
    if dist.is_initialized():
        ranks = dist.get_world_size(group)
        if ranks > 1:
            dist.all_reduce(flat, group=group)
    values = flat.cpu().tolist()
    loads, start = [], 0
    for e in num_experts:
        loads.append(tuple(values[start:start + e]))
        start += e
    return WindowLoads(tuple(loads), values[-1] / 1e6 / ranks / steps)


def rank_load_ratios(expert_loads: Sequence[Sequence[int]], rank_ofs: Sequence[Sequence[int]],
                     ep_sizes: Sequence[int]) -> Tuple[float, ...]:
    """Per layer, max/mean of the EP ranks' loads under the given placements (``rank_ofs[l][e]``: EP rank of
    expert e of layer l); 1.0 for a layer without counted tokens."""
    return tuple(max_over_mean(rank_loads(loads, rank_of, ep))
                 for loads, rank_of, ep in zip(expert_loads, rank_ofs, ep_sizes))
