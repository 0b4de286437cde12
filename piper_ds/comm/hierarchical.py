"""Hierarchical (HALO-style) uneven all-to-all: the transport for expert-parallel groups that span nodes.

Same contract as :class:`piper_ds.comm.alltoall.FlatAllToAll` (rows for rank r are the r-th contiguous block
of the input; received rows are ordered by source rank; backward is the reverse exchange), different wire
pattern: Phase I (node-local rows) runs alongside Phase II (one packed message per (node, peer node) lane,
lane (n, i) -> (m, i), so each local rank's NIC carries its share of the node's traffic), then Phase III
redistributes the received rows inside the node. On one node only Phase I is left, the flat exchange, and
the call runs it as one ``all_to_all_single``. :mod:`piper_ds.comm.hier_plan` builds the plan as data;
this module runs it with batched asynchronous point-to-point (``dist.batch_isend_irecv``).

By default the rows that cross nodes are those of the flat exchange (a token bound for two ranks of one remote
node is two rows); what changes is the number of inter-node messages per rank, (N-1) instead of (N-1)·L, and
their size, L times larger. With ``node_dedup`` and a plan made with the rows' source ids, a source crosses
once per remote node and the lane receiver fans it out (:mod:`piper_ds.comm.hier_dedup`).

Counts: the receivers of Phase II must know, before receiving, how many rows each lane carries for each final
receiver. :meth:`HierarchicalAllToAll.plan` gets them for free from a hierarchical counts exchange (use it
when you hold the send counts); ``__call__`` without a plan gathers them with one small intra-node round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from piper_ds.comm import hier_dedup
from piper_ds.comm.alltoall import FlatAllToAll, TransportCapabilities
from piper_ds.comm.hier_dedup import DedupPlan
from piper_ds.comm.hier_plan import (ExchangePlan, Message, Stage, build_plan, lane_vector_for,
                                     lanes_from_counts_exchange)
from piper_ds.comm.topology import GroupLayout, Topology, TopologyConfig
from piper_ds.ops import hier_pack

TopologyLike = Union[Topology, TopologyConfig, int, None]
Plan = Union[ExchangePlan, DedupPlan]


def resolve_topology(topology: TopologyLike) -> Topology:
    """A :class:`Topology` from a Topology, a TopologyConfig, an int (gpus_per_node) or None (environment)."""
    if isinstance(topology, Topology):
        return topology
    if isinstance(topology, TopologyConfig):
        return Topology.from_config(topology)
    if topology is None or isinstance(topology, int):
        return Topology.from_env(topology)
    raise TypeError(f"topology must be a Topology, TopologyConfig, int or None, got {type(topology).__name__}")


def group_global_ranks(group: Optional[dist.ProcessGroup]) -> List[int]:
    """Global ranks of ``group`` in group-rank order.

    As in :mod:`piper_ds.comm.alltoall`, ``None`` (or torch.distributed not initialised) is a group of one:
    this rank. Pass ``dist.group.WORLD`` for the whole job.
    """
    if not dist.is_initialized():
        return [0]
    if group is None:
        return [dist.get_rank()]
    if group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def group_layout(group: Optional[dist.ProcessGroup], topology: TopologyLike = None) -> GroupLayout:
    """How ``group`` lies across the nodes of ``topology`` (checked against the running world size)."""
    topo = resolve_topology(topology)
    if dist.is_initialized() and topo.world_size != dist.get_world_size():
        raise ValueError(f"topology is for {topo.world_size} ranks but the job has {dist.get_world_size()}")
    return topo.group_layout(group_global_ranks(group))


def spans_nodes(group: Optional[dist.ProcessGroup], topology: TopologyLike = None) -> bool:
    """True when the ranks of ``group`` sit on more than one node of ``topology``."""
    return group_layout(group, topology).spans_nodes


# ------------------------------------------------------------------------------------- running a plan
@dataclass(frozen=True)
class Wire:
    """Where messages go: the process group, its members' global ranks, and the pack/unpack backend."""

    group: Optional[dist.ProcessGroup]
    global_ranks: Tuple[int, ...]
    pack_backend: str = "auto"


def _one_buffer(m: Message) -> str:
    names = {b for b, _, n in m.blocks if n}
    if len(names) > 1:
        raise AssertionError(f"message to/from rank {m.peer} mixes buffers {sorted(names)}")
    return names.pop() if names else "x"


def _local_copy(send: Message, recv: Message, bufs, backend: str) -> None:
    if [n for _, _, n in send.blocks] != [n for _, _, n in recv.blocks]:
        raise AssertionError(f"local copy blocks differ: {send.blocks} vs {recv.blocks}")
    if send.rows:
        hier_pack.segment_copy(bufs[_one_buffer(send)], [s for _, s, _ in send.blocks], bufs[_one_buffer(recv)],
                               [s for _, s, _ in recv.blocks], [n for _, _, n in send.blocks], backend)


def run_stage(stage: Stage, bufs, me: int, wire: Wire) -> None:
    """Posts every message of ``stage`` as one ``batch_isend_irecv``, does the local copy, waits, unpacks."""
    ops, unpacks = [], []
    own_send = own_recv = None
    tail = tuple(bufs["x"].shape[1:])
    for m in stage.recvs:
        runs = m.runs()
        if m.peer == me:
            own_recv = m
        elif len(runs) == 1:  # a plain slice of the destination: receive in place
            b, s, n = runs[0]
            ops.append(dist.P2POp(dist.irecv, bufs[b][s:s + n], wire.global_ranks[m.peer], wire.group))
        elif runs:
            tmp = bufs["x"].new_empty((m.rows, ) + tail)
            unpacks.append((tmp, m))
            ops.append(dist.P2POp(dist.irecv, tmp, wire.global_ranks[m.peer], wire.group))
    for m in stage.sends:
        runs = m.runs()
        if m.peer == me:
            own_send = m
        elif runs:
            src = bufs[_one_buffer(m)]
            out = src[runs[0][1]:runs[0][1] + runs[0][2]] if len(runs) == 1 else \
                hier_pack.pack(src, [s for _, s, _ in runs], [n for _, _, n in runs], wire.pack_backend)
            ops.append(dist.P2POp(dist.isend, out, wire.global_ranks[m.peer], wire.group))
    works = dist.batch_isend_irecv(ops) if ops else []
    if own_send is not None or own_recv is not None:  # overlaps with the messages in flight
        if own_send is None or own_recv is None:
            raise AssertionError(f"rank {me}: local copy has only one side in stage {stage.name!r}")
        _local_copy(own_send, own_recv, bufs, wire.pack_backend)
    for w in works:
        w.wait()
    for tmp, m in unpacks:
        runs = m.runs()
        hier_pack.unpack(tmp, bufs[_one_buffer(m)], [s for _, s, _ in runs], [n for _, _, n in runs],
                         wire.pack_backend)


def run_plan(plan: Plan, x: torch.Tensor, wire: Wire) -> Tuple[torch.Tensor, torch.Tensor]:
    """Runs ``plan`` on x [sum(send_counts), ...]; returns (y [sum(recv_counts), ...], staging z [Z, ...])."""
    if x.shape[0] != plan.in_rows:
        raise ValueError(f"x has {x.shape[0]} rows but send_counts sum to {plan.in_rows}")
    x = x.contiguous()
    tail, zeroed = tuple(x.shape[1:]), plan.zeroed
    bufs = {"x": x}
    for name, rows in plan.buffer_rows().items():
        if name != "x":
            bufs[name] = (x.new_zeros if name in zeroed else x.new_empty)((rows, ) + tail)
    for step in plan.steps:
        if isinstance(step, Stage):
            run_stage(step, bufs, plan.me, wire)
        else:  # a local row map of a dedup plan
            step.apply(bufs)
    return bufs["y"], bufs["z"]


class _HierExchange(torch.autograd.Function):
    """y = exchange(x) along ``plan``; backward runs the reversed plan on the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: Plan, wire: Wire) -> torch.Tensor:
        ctx.plan, ctx.wire = plan, wire
        return run_plan(plan, x, wire)[0]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return run_plan(ctx.plan.reversed(), grad_y.contiguous(), ctx.wire)[0], None, None


# ------------------------------------------------------------------------------------------ transport
class HierarchicalAllToAll:
    """Uneven all-to-all over ``group`` in three phases (module docstring); a drop-in flat replacement.

    ``topology``: a :class:`Topology`, a :class:`TopologyConfig`, an int (gpus_per_node) or None (read the
    launcher's environment). The group must have the same number of ranks on each node it touches.
    ``node_dedup``: :meth:`plan` takes the source id of every sent row and sends each source once per remote
    node (:mod:`piper_ds.comm.hier_dedup`); calls without a plan are never deduplicated.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, topology: TopologyLike = None,
                 pack_backend: str = "auto", node_dedup: bool = False):
        self.group = group
        self.node_dedup = bool(node_dedup)
        self.layout = group_layout(group, topology)
        self.size = self.layout.size
        self.me = dist.get_rank(group) if dist.is_initialized() and group is not None else 0
        self.wire = Wire(group, self.layout.global_ranks, pack_backend)
        self._flat = FlatAllToAll(group)  # the whole exchange when the group sits on one node
        self._connected = self.size == 1 or dist.get_backend(group) != "nccl"
        W, N, L = self.size, self.layout.num_nodes, self.layout.local_size
        ones = [1] * W
        self._counts_plan = build_plan(self.layout, self.me, ones, ones, [[1] * L for _ in range(N)])

    @property
    def capabilities(self) -> TransportCapabilities:
        return TransportCapabilities(self.size, plans_exchange=True, node_dedup=self.node_dedup)

    def __repr__(self) -> str:
        dedup = ", node dedup" if self.node_dedup else ""
        return f"HierarchicalAllToAll({self.layout.describe()}, rank {self.me}{dedup})"

    def _connect(self, device: torch.device) -> None:
        # NCCL: the first call on a group's communicator must involve every rank; a rank whose messages
        # are all empty posts nothing, so create the communicator with one collective first.
        if not self._connected:
            dist.all_reduce(torch.zeros(1, device=device), group=self.group)
            self._connected = True

    def exchange_counts(self, send_counts_R: torch.Tensor) -> torch.Tensor:
        """recv_counts_R [W] int64 from send_counts_R [W] int64, exchanged along the hierarchical pattern."""
        return self._exchange_counts(send_counts_R)[0].view(-1)

    def plan(self, send_counts_R: torch.Tensor, source_ids: Optional[torch.Tensor] = None) -> Plan:
        """Exchanges counts; returns the plan of the data exchange (``plan.recv_counts``: the received counts).

        The counts travel along the same hierarchical pattern, and the lane receivers find the lane counts in
        their staging buffer: pass the plan to ``__call__`` (and ``plan.reversed()`` for the opposite,
        combine, direction) to skip the lane round there.

        With ``node_dedup``, ``source_ids`` [sum(send_counts)] (int, in [0, 2**40)) names the source of every
        row to send (equal ids = equal rows) and is required; the plan is then a :class:`DedupPlan` when the
        group has several nodes and several local ranks (one more Phase II round of one int64 per row, to
        tell the lane receivers how to fan out), else the plain plan (nothing to save). Without
        ``node_dedup`` the ids are ignored. Collective: every rank of the group calls it.
        """
        if self.node_dedup and source_ids is None:
            raise ValueError("this transport has node_dedup=True: plan() needs source_ids, the source id of "
                             "every sent row")
        if self.layout.num_nodes == 1:  # one node: the flat counts exchange, and no lanes to learn
            recv = self._flat.exchange_counts(send_counts_R.to(torch.int64))
            base = build_plan(self.layout, self.me, send_counts_R.tolist(), recv.tolist(), None)
            if self.node_dedup:
                hier_dedup.check_source_ids(source_ids, base.in_rows)
            return base
        recv, z = self._exchange_counts(send_counts_R)
        lane = lanes_from_counts_exchange(self._counts_plan, z.view(-1).tolist())
        base = build_plan(self.layout, self.me, send_counts_R.tolist(), recv.view(-1).tolist(), lane)
        if not self.node_dedup:
            return base
        hier_dedup.check_source_ids(source_ids, base.in_rows)
        if self.layout.num_nodes == 1 or self.layout.local_size == 1:
            return base  # one node: nothing crosses; one rank per node: a row per (source, node) already
        return self._dedup_plan(base, source_ids.to(send_counts_R.device))

    def _dedup_plan(self, base: ExchangePlan, source_ids: torch.Tensor) -> DedupPlan:
        """Dedups ``base``: the senders' row indices travel over Phase II so the lane receivers can fan out."""
        first_U, inv_S, u_counts = hier_dedup.sender_side(base, source_ids)
        s1 = base.stages[0]
        remote_only = Stage("dedup index", tuple(m for m in s1.sends if self._remote(m.peer)),
                            tuple(m for m in s1.recvs if self._remote(m.peer)))
        index_plan = ExchangePlan(base.layout, base.me, base.send_counts, base.recv_counts, (remote_only, ),
                                  base.z_rows)
        z_idx = run_plan(index_plan, inv_S.view(-1, 1), self.wire)[1].view(-1)
        v_counts, index_Z, groups = hier_dedup.lane_side(base, z_idx)
        return hier_dedup.build_dedup_plan(base, first_U, u_counts, v_counts, index_Z, groups)

    def _remote(self, g: int) -> bool:
        return self.layout.coords(g)[0] != self.layout.coords(self.me)[0]

    def _exchange_counts(self, send_counts_R: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if send_counts_R.shape != (self.size, ):
            raise ValueError(f"send_counts_R must have shape ({self.size},), got {tuple(send_counts_R.shape)}")
        self._connect(send_counts_R.device)
        return run_plan(self._counts_plan, send_counts_R.to(torch.int64).view(self.size, 1), self.wire)

    def plan_from_counts(self, send_counts: Sequence[int], recv_counts: Sequence[int],
                         device: torch.device) -> ExchangePlan:
        """The plan for known counts; gathers the lane counts with one intra-node round when N, L > 1."""
        n, i = self.layout.coords(self.me)
        N, L, M = self.layout.num_nodes, self.layout.local_size, self.layout.members
        lane = None
        if N > 1 and L > 1:
            self._connect(device)
            ops, got = [], {}
            for j in range(L):
                if j == i:
                    continue
                peer = self.wire.global_ranks[M[n][j]]
                mine = torch.tensor(lane_vector_for(self.layout, M[n][j], recv_counts), dtype=torch.int64,
                                    device=device)
                got[j] = torch.empty(N, dtype=torch.int64, device=device)
                ops += [dist.P2POp(dist.isend, mine, peer, self.group), dist.P2POp(dist.irecv, got[j], peer,
                                                                                    self.group)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            cols = {j: t.tolist() for j, t in got.items()}
            lane = [[cols[j][m] if j != i else int(recv_counts[M[m][i]]) for j in range(L)] for m in range(N)]
        return build_plan(self.layout, self.me, send_counts, recv_counts, lane)

    def __call__(self, x: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
                 plan: Optional[Plan] = None) -> torch.Tensor:
        """y [sum(recv_counts), ...] from x [sum(send_counts), ...]; differentiable (backward = reverse).

        ``plan`` (from :meth:`plan`, or its ``.reversed()`` for the combine direction) skips the lane round.
        A :class:`DedupPlan` assumes x's rows are those whose ``source_ids`` made it (equal ids, equal rows);
        its reverse returns, per (source, remote node), the sum in the first row and zeros in the others.
        """
        send_counts, recv_counts = [int(c) for c in send_counts], [int(c) for c in recv_counts]
        if plan is not None and (list(plan.send_counts) != send_counts or list(plan.recv_counts) != recv_counts):
            raise ValueError(f"plan is for send {list(plan.send_counts)} / recv {list(plan.recv_counts)}, "
                             f"called with send {send_counts} / recv {recv_counts}")
        if self.layout.num_nodes == 1:
            # One node: Phase I is the whole exchange, the flat one, and NCCL's all-to-all runs it faster
            # than the same messages as batched point-to-point (those took 1.1x-3.4x its time from 1 GB down to
            # 1 MB per rank on 4x H200).
            return self._flat(x, send_counts, recv_counts)
        if plan is None:
            plan = self.plan_from_counts(send_counts, recv_counts, x.device)
        self._connect(x.device)
        return _HierExchange.apply(x, plan, self.wire)
