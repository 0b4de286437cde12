"""Cluster topology: which rank sits on which node, and how an expert-parallel group lies across nodes.

The launchers we support place ranks node-major: global rank ``r`` runs on node ``r // gpus_per_node`` as
local rank ``r % gpus_per_node`` (torchrun, the DeepSpeed launcher and SLURM's default block distribution do
this; a round-robin placement such as ``mpirun --map-by node`` does not). ``gpus_per_node`` comes from, in order:

1. an explicit override — the ``"piper": {"topology": {"gpus_per_node": N}}`` block (:class:`TopologyConfig`),
   which lets one host pose as several nodes (4 GPUs seen as 2 nodes × 2);
2. ``LOCAL_WORLD_SIZE`` (torchrun, DeepSpeed launcher), ``LOCAL_SIZE`` (DeepSpeed's MPI discovery),
   ``OMPI_COMM_WORLD_LOCAL_SIZE`` (Open MPI);
3. ``SLURM_NTASKS_PER_NODE`` or a homogeneous ``SLURM_TASKS_PER_NODE`` (``"4(x2)"``);
4. otherwise every rank is taken to be on one node.

The world size comes from torch.distributed when it is initialised, else ``WORLD_SIZE`` or ``SLURM_NTASKS``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field

_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


class TopologyConfig(BaseModel):
    """The ``"topology"`` entry of the ``"piper"`` block of a ds_config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus_per_node: Optional[int] = Field(
        None, ge=1,
        description="Ranks per node. None = read it from the launcher's environment (LOCAL_WORLD_SIZE, "
        "LOCAL_SIZE, SLURM_*). Smaller than the real value makes one host pose as several nodes, e.g. 2 "
        "on a 4-GPU host runs the multi-node (hierarchical) paths as 2 nodes x 2.")


def _parse_slurm_tasks_per_node(value: str) -> int:
    """``"4"``, ``"4(x2)"`` or ``"4(x2),4"`` -> 4; raises ValueError for heterogeneous nodes (``"4,2"``)."""
    counts = set()
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(\(x\d+\))?\s*", part)
        if m is None:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={value!r}")
        counts.add(int(m.group(1)))
    if len(counts) != 1:
        raise ValueError(f"SLURM_TASKS_PER_NODE={value!r} gives nodes different task counts {sorted(counts)}; "
                         "set piper.topology.gpus_per_node explicitly")
    return counts.pop()


def gpus_per_node_from_env(env: Mapping[str, str]) -> Optional[Tuple[int, str]]:
    """(ranks per node, the variable it came from), or None when the environment does not say."""
    for name in _LOCAL_SIZE_VARS:
        if env.get(name):
            return int(env[name]), name
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"]), "SLURM_NTASKS_PER_NODE"
    if env.get("SLURM_TASKS_PER_NODE"):
        return _parse_slurm_tasks_per_node(env["SLURM_TASKS_PER_NODE"]), "SLURM_TASKS_PER_NODE"
    return None


def world_size_from_env(env: Mapping[str, str]) -> int:
    """World size of the job: torch.distributed if initialised, else WORLD_SIZE / SLURM_NTASKS, else 1."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(name):
            return int(env[name])
    return 1


@dataclass(frozen=True)
class Topology:
    """``world_size`` ranks on ``world_size // gpus_per_node`` nodes, placed node-major.

    ``source`` says where ``gpus_per_node`` came from (for logs and error messages).
    """

    world_size: int
    gpus_per_node: int
    source: str = "explicit"

    def __post_init__(self):
        if self.world_size < 1 or self.gpus_per_node < 1:
            raise ValueError(f"world_size ({self.world_size}) and gpus_per_node ({self.gpus_per_node}) "
                             "must be >= 1")
        if self.world_size % self.gpus_per_node:
            raise ValueError(f"world_size ({self.world_size}) is not divisible by gpus_per_node "
                             f"({self.gpus_per_node}, from {self.source})")

    @classmethod
    def from_env(cls, override: Optional[int] = None, world_size: Optional[int] = None,
                 env: Optional[Mapping[str, str]] = None) -> "Topology":
        """Topology of this job; ``override`` (``piper.topology.gpus_per_node``) wins over the environment.

        A launcher that reports more ranks per node than there are ranks (one process per node of a
        single-rank job) is read as one node.
        """
        env = os.environ if env is None else env
        world = world_size_from_env(env) if world_size is None else int(world_size)
        if override is not None:
            return cls(world, int(override), "override")
        found = gpus_per_node_from_env(env)
        if found is None:
            return cls(world, world, "default: one node")
        per_node, source = found
        return cls(world, min(per_node, world), source)

    @classmethod
    def from_config(cls, config: Optional[TopologyConfig], world_size: Optional[int] = None) -> "Topology":
        """Same as :meth:`from_env` with the override taken from a :class:`TopologyConfig` (or None)."""
        return cls.from_env(None if config is None else config.gpus_per_node, world_size)

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.gpus_per_node

    def node_of(self, rank: int) -> int:
        """Node index of global ``rank``."""
        self._check_rank(rank)
        return rank // self.gpus_per_node

    def local_rank_of(self, rank: int) -> int:
        """Index of global ``rank`` among the ranks of its node."""
        self._check_rank(rank)
        return rank % self.gpus_per_node

    def ranks_on_node(self, node: int) -> List[int]:
        """Global ranks of ``node``, ascending."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node {node} out of range for {self.num_nodes} nodes")
        return list(range(node * self.gpus_per_node, (node + 1) * self.gpus_per_node))

    def group_layout(self, global_ranks: Sequence[int]) -> "GroupLayout":
        """How the group made of ``global_ranks`` (in group-rank order) lies across the nodes."""
        return GroupLayout.build(global_ranks, [self.node_of(r) for r in global_ranks])

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for world_size {self.world_size}")


@dataclass(frozen=True)
class GroupLayout:
    """A process group seen as ``num_nodes`` × ``local_size`` ranks.

    Nodes are numbered by their first member in group order; a member's local index is its order among the
    group's members on its node. ``members[n][l]`` is the group rank of (node n, local l).
    """

    global_ranks: Tuple[int, ...]
    node_ids: Tuple[int, ...]  # topology node id of each group rank
    members: Tuple[Tuple[int, ...], ...]
    coords_of: Tuple[Tuple[int, int], ...]  # (node index, local index) of each group rank

    @classmethod
    def build(cls, global_ranks: Sequence[int], node_ids: Sequence[int]) -> "GroupLayout":
        """Layout of the group whose rank g is global rank ``global_ranks[g]`` on node ``node_ids[g]``."""
        if len(global_ranks) != len(node_ids):
            raise ValueError(f"{len(global_ranks)} ranks but {len(node_ids)} node ids")
        by_node: Dict[int, List[int]] = {}
        for g, node in enumerate(node_ids):
            by_node.setdefault(int(node), []).append(g)
        members = tuple(tuple(ms) for ms in by_node.values())  # dicts keep first-appearance order
        sizes = {node: len(ms) for node, ms in by_node.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the group has different numbers of ranks per node (node: ranks = {sizes}); "
                             "a hierarchical exchange needs the same number on every node")
        coords = [(0, 0)] * len(node_ids)
        for n, ms in enumerate(members):
            for l, g in enumerate(ms):
                coords[g] = (n, l)
        return cls(tuple(int(r) for r in global_ranks), tuple(int(n) for n in node_ids), members, tuple(coords))

    @property
    def size(self) -> int:
        return len(self.global_ranks)

    @property
    def num_nodes(self) -> int:
        return len(self.members)

    @property
    def local_size(self) -> int:
        return len(self.members[0])

    @property
    def spans_nodes(self) -> bool:
        return self.num_nodes > 1

    def coords(self, group_rank: int) -> Tuple[int, int]:
        """(node index within the group, local index) of ``group_rank``."""
        return self.coords_of[group_rank]

    def describe(self) -> str:
        """E.g. ``'2 nodes x 2 ranks'``."""
        return f"{self.num_nodes} node{'s' if self.num_nodes != 1 else ''} x {self.local_size} rank" + \
            ("s" if self.local_size != 1 else "")
