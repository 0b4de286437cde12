"""The plan of one hierarchical (HALO-style) uneven all-to-all, as pure data: who sends which rows to whom.

An expert-parallel group of W = N nodes × L local ranks; rank ``me`` = (node n, local i). ``c[g -> h]`` is the
number of rows group rank g sends to group rank h. Three phases, run as two stages of batched point-to-point:

* stage 1 = **Phase I ∥ Phase II**. Phase I: rows for ranks of my own node go straight to them (and my rows
  for myself are copied). Phase II: all my rows for remote node m travel as *one* packed message to the rank
  of node m with my local index i — the lane (n, i) -> (m, i). Every local rank owns the lanes of its own
  index, so the node's traffic to node m is spread over all L NICs (rail-aligned: local rank i of every node
  talks only to local rank i of the others), and each rank sends N-1 inter-node messages instead of
  (N-1)·L. The lane receiver stores them in a staging buffer ``z``, node-major, then by final receiver j.
* stage 2 = **Phase III**. The lane receiver forwards to local rank j the rows for j from every remote node,
  one packed message per (lane receiver, j), and copies its own share into place.

Buffers are named: ``x`` the input (rows ordered by destination group rank), ``y`` the output (rows ordered
by source group rank), ``z`` the staging buffer. A message is a list of *blocks* (buffer, first row, rows);
the sender's and the receiver's block lists of a message have the same lengths in the same order, so a packed
message is gathered from the sender's blocks and scattered to the receiver's. The reverse exchange (autograd
backward) is the same plan read backwards: stages in reverse order, sends <-> receives, ``x`` <-> ``y``.

The lane receiver must know ``lane[m][j] = c[(m, i) -> (n, j)]`` for every remote node m: the final
receivers know it (their receive counts), :func:`lane_vector_for` is what each of them contributes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Dict, List, Optional, Sequence, Tuple

from piper_ds.comm.topology import GroupLayout

Block = Tuple[str, int, int]  # (buffer name: 'x' | 'y' | 'z' (| 'u' | 'v' with dedup), first row, rows)
_SWAP = {"x": "y", "y": "x", "z": "z", "u": "u", "v": "v"}  # u, v: dedup buffers


@dataclass(frozen=True)
class Message:
    """Rows exchanged with group rank ``peer`` in one stage: the concatenation of ``blocks``."""

    peer: int
    blocks: Tuple[Block, ...]

    @property
    def rows(self) -> int:
        return sum(b[2] for b in self.blocks)

    def runs(self) -> List[Block]:
        """The non-empty blocks with adjacent ones merged: one run means the message is a plain slice."""
        out: List[Block] = []
        for buf, start, n in self.blocks:
            if n == 0:
                continue
            if out and out[-1][0] == buf and out[-1][1] + out[-1][2] == start:
                out[-1] = (buf, out[-1][1], out[-1][2] + n)
            else:
                out.append((buf, start, n))
        return out

    def swapped(self) -> "Message":
        return Message(self.peer, tuple((_SWAP[b], s, n) for b, s, n in self.blocks))


@dataclass(frozen=True)
class Stage:
    """One batch of point-to-point messages; a message to/from ``me`` is a local copy."""

    name: str
    sends: Tuple[Message, ...]
    recvs: Tuple[Message, ...]


@dataclass(frozen=True)
class ExchangePlan:
    """Everything rank ``me`` does in one hierarchical all-to-all (see the module docstring)."""

    layout: GroupLayout
    me: int
    send_counts: Tuple[int, ...]
    recv_counts: Tuple[int, ...]
    stages: Tuple[Stage, ...]
    z_rows: int

    @property
    def in_rows(self) -> int:
        return sum(self.send_counts)

    @property
    def out_rows(self) -> int:
        return sum(self.recv_counts)

    @property
    def steps(self) -> Tuple[Stage, ...]:
        """What the runner executes in order (a dedup plan interleaves local row maps with the stages)."""
        return self.stages

    @property
    def zeroed(self) -> Tuple[str, ...]:
        """Buffers that must start as zeros: none, every output row is received."""
        return ()

    def buffer_rows(self) -> Dict[str, int]:
        """Rows of every buffer the plan names."""
        return {"x": self.in_rows, "y": self.out_rows, "z": self.z_rows}

    def without_dedup(self) -> "ExchangePlan":
        """This plan (the plain exchange); a :class:`~piper_ds.comm.hier_dedup.DedupPlan` returns its base."""
        return self

    def reversed(self) -> "ExchangePlan":
        """The plan of the reverse exchange (its input is this plan's output): backward of this one."""
        stages = tuple(reverse_stage(s) for s in reversed(self.stages))
        return replace(self, send_counts=self.recv_counts, recv_counts=self.send_counts, stages=stages)

    def inter_node_rows(self) -> int:
        """Rows this rank sends to ranks of other nodes (the bytes its NIC carries, divided by row bytes)."""
        return stage_message_counts(self.layout, self.me, self.stages)[2]

    def messages_sent(self) -> Tuple[int, int]:
        """(intra-node, inter-node) non-empty messages this rank sends, local copies not counted."""
        return stage_message_counts(self.layout, self.me, self.stages)[:2]


def reverse_stage(s: Stage) -> Stage:
    """The stage read backwards: sends <-> receives, ``x`` <-> ``y``."""
    return Stage(s.name + " (reverse)", tuple(m.swapped() for m in s.recvs), tuple(m.swapped() for m in s.sends))


def stage_message_counts(layout: GroupLayout, me: int, stages: Sequence[Stage]) -> Tuple[int, int, int]:
    """(intra-node messages, inter-node messages, inter-node rows) that rank ``me`` sends in ``stages``;
    empty messages and local copies are not counted."""
    node = layout.coords(me)[0]
    intra = inter = rows = 0
    for s in stages:
        for m in s.sends:
            if m.peer == me or m.rows == 0:
                continue
            if layout.coords(m.peer)[0] == node:
                intra += 1
            else:
                inter += 1
                rows += m.rows
    return intra, inter, rows


def _offsets(counts: Sequence[int]) -> List[int]:
    return [0] + list(accumulate(counts))[:-1]


def check_counts(layout: GroupLayout, send_counts: Sequence[int], recv_counts: Sequence[int]) -> None:
    """Raises ValueError unless both count lists have one non-negative int per rank of the group."""
    for name, counts in (("send_counts", send_counts), ("recv_counts", recv_counts)):
        if len(counts) != layout.size:
            raise ValueError(f"{name} has {len(counts)} entries, the group has {layout.size} ranks")
        if any(int(c) < 0 for c in counts):
            raise ValueError(f"{name} must be non-negative, got {list(counts)}")


def lane_vector_for(layout: GroupLayout, lane_rank: int, recv_counts: Sequence[int]) -> List[int]:
    """What a final receiver tells lane receiver ``lane_rank`` = (n, i): its receive count from (m, i), each m."""
    i = layout.coords(lane_rank)[1]
    return [int(recv_counts[layout.members[m][i]]) for m in range(layout.num_nodes)]


def build_plan(layout: GroupLayout, me: int, send_counts: Sequence[int], recv_counts: Sequence[int],
               lane: Optional[Sequence[Sequence[int]]] = None) -> ExchangePlan:
    """The plan of rank ``me``. ``lane[m][j]`` = rows (m, i) sends to (n, j) (m remote; needed when N, L > 1)."""
    check_counts(layout, send_counts, recv_counts)
    send = [int(c) for c in send_counts]
    recv = [int(c) for c in recv_counts]
    so, ro = _offsets(send), _offsets(recv)
    n, i = layout.coords(me)
    N, L, M = layout.num_nodes, layout.local_size, layout.members
    remote = [m for m in range(N) if m != n]
    if remote and L > 1:
        if lane is None or len(lane) != N or any(len(lane[m]) != L for m in remote):
            raise ValueError(f"rank {me} ({n}, {i}) of a {layout.describe()} group needs lane counts "
                             f"[{N}][{L}], got {lane!r}")
        lane = [[int(c) for c in row] for row in lane]

    # stage 1: Phase I (node-local, including the copy to myself) and Phase II (one packed message per lane)
    s1_send = [Message(g, (("x", so[g], send[g]), )) for g in M[n]]
    s1_recv = [Message(g, (("y", ro[g], recv[g]), )) for g in M[n]]
    z_start = {}
    z_rows = 0
    for m in remote:
        s1_send.append(Message(M[m][i], tuple(("x", so[g], send[g]) for g in M[m])))
        src = M[m][i]
        if L == 1:  # the lane receiver is the final receiver: receive straight into the output
            s1_recv.append(Message(src, (("y", ro[src], recv[src]), )))
            continue
        blocks = []
        for j in range(L):
            rows = recv[src] if j == i else lane[m][j]
            z_start[m, j] = z_rows
            blocks.append(("z", z_rows, rows))
            z_rows += rows
        s1_recv.append(Message(src, tuple(blocks)))
    stages = [Stage("phase I+II", tuple(s1_send), tuple(s1_recv))]

    # stage 2: Phase III, from the staging buffer to the final receivers of my node (and to myself)
    if remote and L > 1:
        s2_send, s2_recv = [], []
        for j, g in enumerate(M[n]):
            rows = [recv[M[m][i]] if j == i else lane[m][j] for m in remote]
            s2_send.append(Message(g, tuple(("z", z_start[m, j], r) for m, r in zip(remote, rows))))
            s2_recv.append(Message(g, tuple(("y", ro[M[m][j]], recv[M[m][j]]) for m in remote)))
        stages.append(Stage("phase III", tuple(s2_send), tuple(s2_recv)))
    return ExchangePlan(layout, me, tuple(send), tuple(recv), tuple(stages), z_rows)


def lanes_from_counts_exchange(plan: ExchangePlan, z_values: Sequence[int]) -> List[List[int]]:
    """Lane counts read from the staging buffer of a *counts* exchange (one row = one count per rank pair).

    When every rank sends its send-count vector with a plan of all-ones counts, the lane receiver's staging
    buffer holds ``c[(m, i) -> (n, j)]`` at block (m, j): exactly the lane counts of the data exchange.
    Rows of the own node are not staged and come back as zeros (they are not used).
    """
    layout = plan.layout
    n, _ = layout.coords(plan.me)
    lane = [[0] * layout.local_size for _ in range(layout.num_nodes)]
    if plan.z_rows == 0:
        return lane
    k = 0
    for m in range(layout.num_nodes):
        if m == n:
            continue
        for j in range(layout.local_size):
            lane[m][j] = int(z_values[k])
            k += 1
    if k != len(z_values):
        raise ValueError(f"staging buffer has {len(z_values)} counts, expected {k}")
    return lane
