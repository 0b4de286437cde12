"""Node-level dedup for the hierarchical all-to-all: a source row bound for several ranks of one remote node
crosses the network once.

The caller names the *source* of every row it sends (``source_ids``: a token id; rows with equal ids carry
equal data). For each remote node m, rank (n, i) sends the distinct sources of all its rows for the ranks of m
— ``u`` buffer, one row per (source, node) — over the Phase II lane (n, i) -> (m, i). The lane receiver keeps
them in a ``v`` buffer and fans them out into the staging buffer ``z`` of the plain plan (one row per
(source, final receiver)); Phase III then runs unchanged. So every final receiver gets exactly the rows, in
the order, of the exchange without dedup; only the rows on the inter-node link change.

As data: a :class:`DedupPlan` is the plain :class:`~piper_ds.comm.hier_plan.ExchangePlan` with Phase II
re-pointed at ``u``/``v`` and two local row maps around it::

    x --gather--> u    stage 1 (Phase I from x, Phase II u -> v)    v --fan-out--> z    stage 2 (Phase III)

Its reverse (autograd backward, and the combine direction) runs the adjoints: the fan-out's adjoint *sums*
the rows of one source that came back from several ranks of the node, so they cross once, summed; the
gather's adjoint puts that sum into the first row of the source for that node and zeros into its other rows
for that node. A caller that sums its returned rows per source id (the MoE combine does) gets the same result
as without dedup, up to the order of the additions. Sums accumulate in at least fp32, without atomics (each
``index_add_`` of a group touches every target row once), so the result is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from piper_ds.comm.hier_plan import ExchangePlan, Message, Stage, reverse_stage, stage_message_counts
from piper_ds.comm.topology import GroupLayout

_SWAP = {"x": "y", "y": "x", "z": "z", "u": "u", "v": "v"}
ID_BITS = 40  # source ids must lie in [0, 2**ID_BITS): (node, id) is packed into one int64 key


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of bf16/fp16 rows accumulate in fp32; other dtypes in themselves."""
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else dtype


@dataclass(frozen=True)
class RowMap:
    """A local step between stages: ``dst[k] = src[index[k]]`` (a fan-out), or read backwards (``adjoint``)
    ``src[r] = sum of dst[k] over index[k] == r``.

    ``groups`` cut the rows k into runs whose index values are distinct — (rows k or None for all, index) —
    summed in order. ``covering``: every src row is indexed at least once (the adjoint then writes all of
    src; otherwise src must be zero where it is not indexed, see :attr:`DedupPlan.zeroed`).
    """

    src: str
    dst: str
    index: torch.Tensor
    groups: Tuple[Tuple[Optional[torch.Tensor], torch.Tensor], ...]
    covering: bool
    adjoint: bool = False

    def reversed(self) -> "RowMap":
        return replace(self, src=_SWAP[self.src], dst=_SWAP[self.dst], adjoint=not self.adjoint)

    def apply(self, bufs: Dict[str, torch.Tensor]) -> None:
        """Runs the step on the named buffers (all preallocated)."""
        if not self.adjoint:
            torch.index_select(bufs[self.src], 0, self.index, out=bufs[self.dst])
            return
        out, rows = bufs[self.src], bufs[self.dst]
        if len(self.groups) == 1:  # distinct targets: a plain scatter, no rounding
            k, idx = self.groups[0]
            out.index_copy_(0, idx, rows if k is None else rows.index_select(0, k))
        elif self.groups:
            acc = torch.zeros(out.shape, dtype=_acc_dtype(out.dtype), device=out.device)
            for k, idx in self.groups:
                acc.index_add_(0, idx, (rows if k is None else rows.index_select(0, k)).to(acc.dtype))
            out.copy_(acc)


Step = Union[Stage, RowMap]


@dataclass(frozen=True)
class DedupPlan:
    """A hierarchical exchange with node-level dedup (module docstring). Same interface as ExchangePlan where
    the transport uses it: counts, :meth:`reversed`, :meth:`inter_node_rows`, :meth:`messages_sent`."""

    base: ExchangePlan  # the same exchange without dedup (for the metadata rows, and for comparison)
    steps: Tuple[Step, ...]
    rows: Tuple[Tuple[str, int], ...]  # rows of every buffer

    layout = property(lambda self: self.base.layout)
    me = property(lambda self: self.base.me)
    send_counts = property(lambda self: self.base.send_counts)
    recv_counts = property(lambda self: self.base.recv_counts)
    in_rows = property(lambda self: self.base.in_rows)
    out_rows = property(lambda self: self.base.out_rows)

    @property
    def stages(self) -> Tuple[Stage, ...]:
        return tuple(s for s in self.steps if isinstance(s, Stage))

    @property
    def zeroed(self) -> Tuple[str, ...]:
        """Buffers that must start as zeros: targets of a scatter that does not write all their rows."""
        return tuple(s.src for s in self.steps if isinstance(s, RowMap) and s.adjoint and not s.covering)

    def buffer_rows(self) -> Dict[str, int]:
        return dict(self.rows)

    def without_dedup(self) -> ExchangePlan:
        """The plain plan of the same exchange (rows that differ per destination, such as routing metadata)."""
        return self.base

    def reversed(self) -> "DedupPlan":
        steps = tuple(reverse_stage(s) if isinstance(s, Stage) else s.reversed() for s in reversed(self.steps))
        return DedupPlan(self.base.reversed(), steps, tuple((_SWAP[b], n) for b, n in self.rows))

    def inter_node_rows(self) -> int:
        """Rows this rank sends to other nodes with dedup (``without_dedup().inter_node_rows()``: without)."""
        return stage_message_counts(self.layout, self.me, self.stages)[2]

    def messages_sent(self) -> Tuple[int, int]:
        """(intra-node, inter-node) non-empty messages this rank sends, local copies not counted."""
        return stage_message_counts(self.layout, self.me, self.stages)[:2]


# ---------------------------------------------------------------------------------- building the plan
def _remote(layout: GroupLayout, me: int) -> List[int]:
    n = layout.coords(me)[0]
    return [m for m in range(layout.num_nodes) if m != n]


def check_source_ids(source_ids: torch.Tensor, rows: int) -> None:
    """Raises ValueError unless ``source_ids`` is an integer vector of ``rows`` ids in [0, 2**ID_BITS)."""
    if source_ids.dim() != 1 or source_ids.shape[0] != rows or source_ids.dtype.is_floating_point:
        raise ValueError(f"source_ids must be an integer vector of {rows} ids (one per sent row), got "
                         f"{tuple(source_ids.shape)} {source_ids.dtype}")
    if rows:
        lo, hi = torch.stack([source_ids.min(), source_ids.max()]).tolist()
        if lo < 0 or hi >= 2**ID_BITS:
            raise ValueError(f"source_ids must lie in [0, 2**{ID_BITS}), got min {lo}, max {hi}")


def sender_side(base: ExchangePlan, source_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """What rank ``base.me`` sends over its lanes with dedup.

    Returns (first_U: positions in x of the first row of each distinct (remote node, source), node-major then by
    id — the ``u`` rows; inv_S: for each row of x bound for a remote node, its index among the distinct rows of
    that node, -1 for rows of the own node; u_counts: distinct rows per remote node, in ``_remote`` order).
    """
    layout, dev = base.layout, source_ids.device
    n = layout.coords(base.me)[0]
    node_of = torch.tensor([-1 if layout.coords(g)[0] == n else layout.coords(g)[0] for g in range(layout.size)],
                           dtype=torch.int64, device=dev)
    S = base.in_rows
    dest_S = torch.repeat_interleave(node_of, torch.tensor(base.send_counts, device=dev), output_size=S)
    rows_R = torch.nonzero(dest_S >= 0).view(-1)
    keys = (dest_S[rows_R] << ID_BITS) | source_ids[rows_R].to(torch.int64)
    uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
    first = torch.full((uniq.numel(), ), S, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, inv, rows_R, reduce="amin")
    per_node = torch.bincount(uniq >> ID_BITS, minlength=layout.num_nodes)
    start = torch.cumsum(per_node, 0) - per_node
    inv_S = torch.full((S, ), -1, dtype=torch.int64, device=dev)
    inv_S[rows_R] = inv - start[dest_S[rows_R]]
    counts = per_node.tolist()
    return first, inv_S, [counts[m] for m in _remote(layout, base.me)]


def lane_side(base: ExchangePlan, z_idx: torch.Tensor) -> Tuple[List[int], torch.Tensor, tuple]:
    """What lane receiver ``base.me`` does with dedup, from ``z_idx`` [z_rows]: each staged row's index among
    the distinct rows its source sent (the ``inv_S`` of :func:`sender_side`, delivered by Phase II).

    Returns (v_counts: distinct rows received per remote node; index_Z: the ``v`` row of each ``z`` row; groups
    for the adjoint sum: z rows cut into runs with distinct ``v`` rows, in z order).
    """
    dev = z_idx.device
    remote = _remote(base.layout, base.me)
    seg_rows = [m.rows for m in base.stages[0].recvs if m.peer != base.me and base.layout.coords(m.peer)[0]
                in remote]
    seg = torch.repeat_interleave(torch.arange(len(seg_rows), device=dev), torch.tensor(seg_rows, device=dev),
                                  output_size=z_idx.numel())
    top = torch.full((len(seg_rows), ), -1, dtype=torch.int64, device=dev).scatter_reduce_(0, seg, z_idx, "amax")
    v_counts = (top + 1).tolist()
    v_start = torch.tensor([0] + v_counts[:-1], device=dev).cumsum(0)
    index_Z = z_idx + v_start[seg]
    V, Z = sum(v_counts), z_idx.numel()
    # the k-th occurrence of a v row among the z rows goes to group k: each group scatters to distinct rows
    order = torch.argsort(index_Z, stable=True)
    per_v = torch.bincount(index_Z, minlength=V)
    occ = torch.empty_like(index_Z)
    occ[order] = torch.arange(Z, device=dev) - (torch.cumsum(per_v, 0) - per_v)[index_Z[order]]
    by_occ = torch.argsort(occ, stable=True)
    sizes = torch.bincount(occ, minlength=1).tolist() if Z else []
    groups, k0 = [], 0
    for n in sizes:
        k = by_occ[k0:k0 + n]
        groups.append((k, index_Z[k]))
        k0 += n
    if len(groups) == 1:
        groups = [(None, index_Z)]
    return v_counts, index_Z, tuple(groups)


def build_dedup_plan(base: ExchangePlan, first_U: torch.Tensor, u_counts: Sequence[int], v_counts: Sequence[int],
                     index_Z: torch.Tensor, groups: tuple) -> DedupPlan:
    """The dedup plan of ``base`` (N > 1 nodes, L > 1 local ranks) from the sender and lane-receiver sides."""
    layout, me = base.layout, base.me
    n, i = layout.coords(me)
    remote = _remote(layout, me)
    if len(base.stages) != 2 or not remote:
        raise ValueError(f"node dedup needs Phase II and Phase III (nodes > 1 and local ranks > 1), got "
                         f"{layout.describe()}")
    u_of, v_of, u0, v0 = {}, {}, 0, 0
    for m, u, v in zip(remote, u_counts, v_counts):
        u_of[layout.members[m][i]], v_of[layout.members[m][i]] = ("u", u0, u), ("v", v0, v)
        u0, v0 = u0 + u, v0 + v
    s1 = base.stages[0]
    stage1 = Stage("phase I+II (dedup)", tuple(Message(m.peer, (u_of[m.peer], )) if m.peer in u_of else m
                                               for m in s1.sends),
                   tuple(Message(m.peer, (v_of[m.peer], )) if m.peer in v_of else m for m in s1.recvs))
    all_rows = ((None, first_U), )
    steps = (RowMap("x", "u", first_U, all_rows, covering=False), stage1,
             RowMap("v", "z", index_Z, groups, covering=True), base.stages[1])
    rows = (("x", base.in_rows), ("y", base.out_rows), ("z", base.z_rows), ("u", u0), ("v", v0))
    return DedupPlan(base, steps, rows)
