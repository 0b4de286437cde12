"""Where each expert lives: the one place that maps a global expert id to (EP rank, local slot).

Nothing else in piper_ds may assume that expert e lives on rank e // experts_per_rank: expert migration
(:func:`piper_ds.balance.mover.migrate_experts`) rewrites this map, and moves the expert's parameters and
optimizer state with it. The dispatcher and the checkpoint code read ``rank_of`` / ``slot_of`` of the layer's one
placement object every time they run, so a rewrite takes effect at the next forward.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


class ExpertPlacement:
    """A bijection between global expert ids and (rank, slot) pairs of an EP group.

    Attributes (int64 tensors of length E): ``rank_of`` (EP rank of each expert), ``slot_of`` (index of the
    expert in its rank's stacked parameters). Without ``rank_of`` the placement is contiguous (expert e on rank
    e // E_local, DeepSpeed's own layout); without ``slot_of`` each rank's experts take its slots in id order.
    """

    def __init__(self, num_experts: int, ep_size: int, rank_of: Optional[Sequence[int]] = None,
                 slot_of: Optional[Sequence[int]] = None):
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local = num_experts // ep_size
        if rank_of is None:  # contiguous blocks: DeepSpeed's own layout, so its checkpoints match
            rank_of = [e // self.num_local for e in range(num_experts)]
        rank_of = torch.as_tensor(list(rank_of), dtype=torch.int64)
        if rank_of.numel() != num_experts:
            raise ValueError(f"rank_of has {rank_of.numel()} entries for {num_experts} experts")
        counts = torch.bincount(rank_of.clamp(0, ep_size), minlength=ep_size + 1)[:ep_size]
        if rank_of.min() < 0 or rank_of.max() >= ep_size or (counts != self.num_local).any():
            raise ValueError(f"rank_of must give each of the {ep_size} ranks exactly {self.num_local} experts, "
                             f"got {rank_of.tolist()}")
        if slot_of is None:
            slot_of = torch.empty_like(rank_of)
            for r in range(ep_size):
                members = (rank_of == r).nonzero(as_tuple=True)[0]
                slot_of[members] = torch.arange(members.numel())
        slot_of = torch.as_tensor(list(slot_of), dtype=torch.int64)
        pairs = set(zip(rank_of.tolist(), slot_of.tolist()))
        if slot_of.numel() != num_experts or len(pairs) != num_experts or \
                not all(0 <= s < self.num_local for s in slot_of.tolist()):
            raise ValueError(f"slot_of {slot_of.tolist()} with rank_of {rank_of.tolist()} must give every expert its "
                             f"own slot in [0, {self.num_local}) of its rank")
        self.rank_of, self.slot_of = rank_of, slot_of

    def local_experts(self, rank: int) -> List[int]:
        """Global ids of the experts held by ``rank``, in slot order."""
        members = (self.rank_of == rank).nonzero(as_tuple=True)[0]
        return members[torch.argsort(self.slot_of[members])].tolist()

    def is_contiguous(self) -> bool:
        """True when expert e sits on rank e // E_local in slot e % E_local (DeepSpeed's layout)."""
        ids = torch.arange(self.num_experts, device=self.rank_of.device)
        return bool(torch.equal(self.rank_of, ids // self.num_local) and torch.equal(self.slot_of, ids % self.num_local))

    def as_lists(self) -> Tuple[List[int], List[int]]:
        """(rank_of, slot_of) as Python lists (what a checkpoint records)."""
        return self.rank_of.tolist(), self.slot_of.tolist()

    def assign(self, other: "ExpertPlacement") -> None:
        """Takes ``other``'s map (same expert count and EP size) in place: everything holding this object (the
        dispatcher) sees the new map. New tensors replace the old ones, on this placement's device."""
        if (other.num_experts, other.ep_size) != (self.num_experts, self.ep_size):
            raise ValueError(f"a placement of {other.num_experts} experts over {other.ep_size} ranks cannot replace "
                             f"one of {self.num_experts} experts over {self.ep_size} ranks")
        device = self.rank_of.device
        self.rank_of, self.slot_of = other.rank_of.to(device), other.slot_of.to(device)

    def swapped(self, pairs: Sequence[Tuple[int, int]]) -> "ExpertPlacement":
        """A new placement where each pair (a, b) of global ids trades places: a takes b's (rank, slot) and b
        takes a's. The experts of ``pairs`` must be distinct (ValueError otherwise)."""
        rank_of, slot_of = self.as_lists()
        seen: set = set()
        for a, b in pairs:
            for e in (a, b):
                if not 0 <= e < self.num_experts:
                    raise ValueError(f"expert id {e} out of range [0, {self.num_experts})")
                if e in seen:
                    raise ValueError(f"expert {e} appears in more than one swap of {list(pairs)}")
                seen.add(e)
            rank_of[a], rank_of[b] = rank_of[b], rank_of[a]
            slot_of[a], slot_of[b] = slot_of[b], slot_of[a]
        return ExpertPlacement(self.num_experts, self.ep_size, rank_of, slot_of)

    def to(self, device) -> "ExpertPlacement":
        self.rank_of, self.slot_of = self.rank_of.to(device), self.slot_of.to(device)
        return self
