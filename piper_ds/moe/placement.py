"""Where each expert lives: the one place that maps a global expert id to (EP rank, local slot).

Nothing else in piper_ds may assume that expert e lives on rank e // experts_per_rank: expert migration
rewrites this map (and moves the expert's parameters and optimizer state with it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


class ExpertPlacement:
    """A bijection between global expert ids and (rank, slot) pairs of an EP group.

    Attributes (int64 tensors of length E): ``rank_of`` (EP rank of each expert), ``slot_of`` (index of the
    expert in its rank's stacked parameters).
    """

    def __init__(self, num_experts: int, ep_size: int, rank_of: Optional[Sequence[int]] = None):
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local = num_experts // ep_size
        if rank_of is None:  # contiguous blocks: DeepSpeed's own layout, so its checkpoints match
            rank_of = [e // self.num_local for e in range(num_experts)]
        rank_of = torch.as_tensor(list(rank_of), dtype=torch.int64)
        if rank_of.numel() != num_experts:
            raise ValueError(f"rank_of has {rank_of.numel()} entries for {num_experts} experts")
        counts = torch.bincount(rank_of, minlength=ep_size)
        if rank_of.min() < 0 or rank_of.max() >= ep_size or (counts != self.num_local).any():
            raise ValueError(f"rank_of must give each of the {ep_size} ranks exactly {self.num_local} experts, "
                             f"got counts {counts.tolist()}")
        slot_of = torch.empty_like(rank_of)
        for r in range(ep_size):
            members = (rank_of == r).nonzero(as_tuple=True)[0]
            slot_of[members] = torch.arange(members.numel())
        self.rank_of, self.slot_of = rank_of, slot_of

    def local_experts(self, rank: int) -> List[int]:
        """Global ids of the experts held by ``rank``, in slot order."""
        members = (self.rank_of == rank).nonzero(as_tuple=True)[0]
        return members[torch.argsort(self.slot_of[members])].tolist()

    def to(self, device) -> "ExpertPlacement":
        self.rank_of, self.slot_of = self.rank_of.to(device), self.slot_of.to(device)
        return self
