"""The (pp, dp, ep) mesh of a pipelined MoE job: layout validation and the process groups.

Ranks are laid out pipe-major, as DeepSpeed's ``PipeDataParallelTopology`` does: stage ``s`` owns the
``dp`` consecutive ranks ``[s*dp, (s+1)*dp)``. Inside a stage:

* dense data parallelism runs over all ``dp`` ranks of the stage (ZeRO-1 shards dense optimizer state there);
* EP groups are runs of ``ep`` consecutive ranks, so they stay inside a stage and, when ``ep`` divides the
  GPUs of a node, inside a node (the Piper layout: all-to-all on NVLink, only stage-to-stage p2p between nodes);
* expert data parallelism joins the ranks holding the same experts, one per EP group of the stage
  (``dp / ep`` ranks; ZeRO-1 shards expert optimizer state there).

The groups themselves are DeepSpeed's: ``deepspeed.utils.groups._create_expert_and_data_parallel`` with the
pipeline size (called by every MoE layer's ``set_deepspeed_parallelism`` at engine init) and the
``PipelineParallelGrid`` of the ``PipelineModule``. :func:`check_groups` verifies that what DeepSpeed built
is the mesh computed here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from piper_ds.system.deepspeed_rules import MAX_ZERO_WITH_PP


@dataclass(frozen=True)
class MeshLayout:
    """A validated (pp, dp, ep) layout.

    Args:
        world_size: all ranks of the job.
        pp: pipeline stages.
        ep: expert-parallel group size (ranks sharing one copy of the routed experts).
        gpus_per_node: ranks per node (fast domain); None = ``LOCAL_WORLD_SIZE`` or the world size.
        zero_stage: DeepSpeed ZeRO stage of the job.
        n_blocks: transformer blocks to cut into stages (None: not checked).
        num_experts: routed experts per MoE layer (None: not checked).
        allow_cross_node_ep: accept EP groups spanning nodes (slow all-to-all); off by default.
    """

    world_size: int
    pp: int
    ep: int
    gpus_per_node: Optional[int] = None
    zero_stage: int = 1
    n_blocks: Optional[int] = None
    num_experts: Optional[int] = None
    allow_cross_node_ep: bool = False

    def __post_init__(self):
        validate_layout(self)

    @property
    def dp(self) -> int:
        """Ranks per stage: the dense data-parallel degree."""
        return self.world_size // self.pp

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: ranks holding the same experts within a stage."""
        return self.dp // self.ep

    @property
    def node_size(self) -> int:
        """Ranks per node used for the locality check."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    # ---------------------------------------------------------------------------------- rank lists
    def stage_of(self, rank: int) -> int:
        """Pipeline stage of a global rank."""
        return rank // self.dp

    def stage_ranks(self, stage: int) -> List[int]:
        """Global ranks of one stage (its dense data-parallel group)."""
        return list(range(stage * self.dp, (stage + 1) * self.dp))

    def ep_groups(self) -> List[List[int]]:
        """Every EP group: ``ep`` consecutive ranks, inside one stage."""
        return [list(range(g * self.ep, (g + 1) * self.ep)) for g in range(self.world_size // self.ep)]

    def edp_groups(self) -> List[List[int]]:
        """Every expert-data-parallel group: same EP position, every EP group of one stage."""
        out = []
        for s in range(self.pp):
            start = s * self.dp
            out += [list(range(start + i, start + self.dp, self.ep)) for i in range(self.ep)]
        return out

    def group_of(self, groups: List[List[int]], rank: int) -> List[int]:
        """The group in ``groups`` that holds ``rank``."""
        return next(g for g in groups if rank in g)

    def describe(self) -> str:
        """One line naming every factor."""
        return (f"world {self.world_size} = pp {self.pp} x dp {self.dp}; dp {self.dp} = ep {self.ep} x "
                f"expert-dp {self.edp}; {self.node_size} ranks per node; ZeRO-{self.zero_stage}")


def validate_layout(layout: MeshLayout) -> None:
    """Raises ValueError naming every factor of the first problem found (see :class:`MeshLayout`)."""
    w, pp, ep = layout.world_size, layout.pp, layout.ep
    for name, value in (("world_size", w), ("pp", pp), ("ep", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if w % pp:
        raise ValueError(f"pp ({pp}) must divide the world size ({w}): every stage needs the same number of ranks")
    dp = w // pp
    if dp % ep:
        raise ValueError(f"ep ({ep}) must divide the ranks of one stage (dp = world {w} / pp {pp} = {dp}): "
                         "EP groups live inside a stage")
    if pp > 1 and layout.zero_stage > MAX_ZERO_WITH_PP:
        raise ValueError(f"ZeRO stage {layout.zero_stage} with pp ({pp}) > 1: DeepSpeed's PipelineEngine supports "
                         'ZeRO 0 and 1 only. Use "zero_optimization": {"stage": 1} (dense optimizer state sharded '
                         f"over dp {dp}, expert state over expert-dp {dp // ep}), or pp 1 for ZeRO-2")
    if layout.n_blocks is not None and pp > layout.n_blocks:
        raise ValueError(f"pp ({pp}) exceeds the transformer blocks ({layout.n_blocks}): every stage needs at "
                         "least one block")
    if layout.num_experts is not None and layout.num_experts % ep:
        raise ValueError(f"num_experts ({layout.num_experts}) must be divisible by ep ({ep})")
    node = layout.node_size
    if node < 1:
        raise ValueError(f"gpus_per_node must be >= 1, got {node}")
    crosses = ep > node or node % ep != 0
    if ep > 1 and crosses and not layout.allow_cross_node_ep:
        raise ValueError(f"ep ({ep}) does not fit the nodes of {node} ranks (EP groups of {ep} consecutive ranks "
                         f"would span nodes, so the all-to-all leaves NVLink). Use an ep that divides {node}, move "
                         f"the factor into pp ({pp}), or set allow_cross_node_ep")


def check_groups(layout: MeshLayout, rank: int, group_name: str) -> None:
    """After engine init: the EP, expert-DP and DP groups DeepSpeed built for ``rank`` are the mesh's.
    Raises RuntimeError naming both rank lists on a mismatch (a wrong group hangs PP+EP, so fail early)."""
    from deepspeed.utils import groups
    got_ep = list(groups._get_expert_parallel_group_ranks(group_name))
    got_edp = list(groups._get_expert_data_parallel_group_ranks(group_name))
    got_dp = list(groups._get_data_parallel_group_ranks()) if groups.mpu is not None else None
    want = {"EP": layout.group_of(layout.ep_groups(), rank), "expert-DP": layout.group_of(layout.edp_groups(), rank),
            "DP": layout.stage_ranks(layout.stage_of(rank))}
    for name, got in (("EP", got_ep), ("expert-DP", got_edp), ("DP", got_dp)):
        if got is not None and sorted(got) != want[name]:
            raise RuntimeError(f"rank {rank}: DeepSpeed's {name} group {got} differs from the mesh's {want[name]} "
                               f"({layout.describe()})")
