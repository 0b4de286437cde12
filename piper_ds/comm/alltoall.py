"""Uneven all-to-all transports for the MoE dispatcher.

A transport moves rows between the ranks of an expert-parallel group. Its contract (every transport keeps it):

* ``exchange_counts(send_counts_R) -> recv_counts_R``: int64 row counts, one per rank of the group ([R], or
  [R, X] for X counts per rank: block r goes to rank r, block r of the result came from rank r);
* ``__call__(x_SD, send_counts, recv_counts) -> y_RD``: rows for rank r are the r-th contiguous block of x,
  rows from rank r form the r-th contiguous block of y, in the sender's order. Differentiable: backward is
  the reverse exchange. ``send_counts``/``recv_counts`` are Python lists of ints.

Optional, for a transport that plans an exchange once and runs it several times (the hierarchical one):

* ``plan(send_counts_R, source_ids=None) -> plan``, collective; ``plan.recv_counts`` (what exchange_counts
  gives), ``plan.reversed()`` (the opposite direction, for the combine), ``plan.without_dedup()``,
  ``plan.inter_node_rows()``; ``__call__(..., plan=plan)`` runs it.
* ``node_dedup`` (bool attribute): when true, ``plan`` needs ``source_ids`` [sum(send_counts)], the source
  (token) of every row; the plan's exchange delivers the same rows, but a source bound for several ranks of
  one remote node crosses once. Its *reverse* is the adjoint: the rows of one source that come back from one
  node arrive summed, in the first of that source's rows for the node, zeros in the others — exact for a
  caller that sums its returned rows per source (the MoE combine). Rows that differ per destination (routing
  metadata) go through ``plan.without_dedup()``.

Optional, for a transport that can leave an exchange in flight while the caller computes (the flat one):

* ``start(x, send_counts, recv_counts) -> AsyncExchange``; ``.wait()`` gives y. Backward: the reverse exchange is
  launched where the autograd graph reaches ``wait`` and waited for where it reaches ``start``, so the autograd
  work between the two (another chunk's experts) runs while the rows travel, in backward as in forward.

A group of one rank moves nothing and costs nothing, so single-process code runs the same path.

Every transport declares what it can do as :class:`TransportCapabilities` (``transport.capabilities``); the MoE
dispatcher factory (:func:`piper_ds.moe.dispatcher.make_dispatcher`) reads them once and never probes methods.
:func:`piper_ds.comm.transports.make_transport` picks the transport a config names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TransportCapabilities:
    """What a transport offers beyond the required contract.

    group_size: ranks of its group. in_flight: ``start`` leaves an exchange in flight. plans_exchange: ``plan``
    and ``__call__(..., plan=)``. node_dedup: its plans need the rows' source ids and dedup per remote node.
    """

    group_size: int
    in_flight: bool = False
    plans_exchange: bool = False
    node_dedup: bool = False


class Transport(Protocol):
    """The seam between the dispatcher and the wire (see module docstring)."""

    group: Optional[dist.ProcessGroup]

    @property
    def capabilities(self) -> TransportCapabilities:
        ...

    def exchange_counts(self, send_counts_R: torch.Tensor) -> torch.Tensor:
        ...

    def __call__(self, x: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]) -> torch.Tensor:
        ...


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """World size of ``group``; 1 when torch.distributed is not initialised or no group is given."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


class _AllToAllSingle(torch.autograd.Function):
    """Uneven ``all_to_all_single`` whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_counts: List[int], recv_counts: List[int], group) -> torch.Tensor:
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        x = x.contiguous()
        out = x.new_empty((sum(recv_counts), ) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts),
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_out = grad_out.contiguous()
        grad_in = grad_out.new_empty((sum(ctx.send_counts), ) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out, output_split_sizes=list(ctx.send_counts),
                               input_split_sizes=list(ctx.recv_counts), group=ctx.group)
        return grad_in, None, None, None


def _launch(x: torch.Tensor, send_counts: List[int], recv_counts: List[int], group):
    """Starts an uneven exchange of ``x``'s rows; returns (output buffer, work). Read the buffer after
    ``work.wait()`` (on CUDA the wait makes the current stream wait for the collective's stream)."""
    x = x.contiguous()
    out = x.new_empty((sum(recv_counts), ) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts),
                                  group=group, async_op=True)
    return out, work


class _Pending:
    """One exchange in flight: its counts, the forward's work and, in backward, the reverse exchange's work."""

    __slots__ = ("send", "recv", "group", "work", "grad_work", "grad_in")

    def __init__(self, send: List[int], recv: List[int], group):
        self.send, self.recv, self.group = send, recv, group
        self.work = self.grad_work = self.grad_in = None


class _ExchangeStart(torch.autograd.Function):
    """Launches the exchange; its output is valid after :class:`_ExchangeFinish`. Backward: waits for the
    reverse exchange that ``_ExchangeFinish.backward`` launched and returns its rows (the gradient autograd hands
    over is ``_ExchangeFinish``'s own, already sent)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: _Pending) -> torch.Tensor:
        ctx.pending = pending
        out, pending.work = _launch(x, pending.send, pending.recv, pending.group)
        return out

    @staticmethod
    def backward(ctx, _grad_out: torch.Tensor):
        pending = ctx.pending
        pending.grad_work.wait()
        grad_in, pending.grad_work, pending.grad_in = pending.grad_in, None, None
        return grad_in, None


class _ExchangeFinish(torch.autograd.Function):
    """Waits for the exchange; backward launches the reverse exchange and hands its (pending) buffer on."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, pending: _Pending) -> torch.Tensor:
        ctx.pending = pending
        pending.work.wait()
        pending.work = None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pending = ctx.pending
        pending.grad_in, pending.grad_work = _launch(grad_out, pending.recv, pending.send, pending.group)
        return grad_out, None  # autograd wants out's shape here; _ExchangeStart returns pending.grad_in


class AsyncExchange:
    """An uneven exchange in flight (:meth:`FlatAllToAll.start`); :meth:`wait` returns its rows, once."""

    def __init__(self, x: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], group, size: int):
        if size == 1:
            self._out, self._pending = x, None
        else:
            self._pending = _Pending(list(send_counts), list(recv_counts), group)
            self._out = _ExchangeStart.apply(x, self._pending)

    def wait(self) -> torch.Tensor:
        """The received rows [sum(recv_counts), ...]; differentiable."""
        if self._out is None:
            raise RuntimeError("AsyncExchange.wait() was already called")
        out, self._out = self._out, None
        return out if self._pending is None else _ExchangeFinish.apply(out, self._pending)


class FlatAllToAll:
    """One collective ``all_to_all_single`` over the whole EP group (NCCL/gloo pick the algorithm)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.size = group_size(group)

    @property
    def capabilities(self) -> TransportCapabilities:
        return TransportCapabilities(self.size, in_flight=True)

    def exchange_counts(self, send_counts_R: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return send_counts_R.clone()
        recv = torch.empty_like(send_counts_R)
        dist.all_to_all_single(recv, send_counts_R.contiguous(), group=self.group)
        return recv

    def __call__(self, x: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]) -> torch.Tensor:
        if self.size == 1:
            return x
        return _AllToAllSingle.apply(x, list(send_counts), list(recv_counts), self.group)

    def start(self, x: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]) -> AsyncExchange:
        """The exchange of :meth:`__call__`, left in flight: ``.wait()`` gives its rows (see module docstring)."""
        return AsyncExchange(x, send_counts, recv_counts, self.group, self.size)
