"""The dispatcher of a PiperMoE layer: routed tokens -> local experts -> weighted sums back at their tokens.

One seam, chosen once per layer by :func:`make_dispatcher` from the layer's EP size, its config and the
transport's declared capabilities (:class:`~piper_ds.comm.alltoall.TransportCapabilities`):

* :class:`LocalDispatcher` (ep_size 1): route plan straight from the router's top-k, expand, grouped MLP, weighted
  reduce. No exchange and no wait for the device: every size is known on the host (dropless: T * K rows; with a
  capacity, a bounded plan of T * K rows whose unused tail is skipped).
* :class:`FlatDispatcher` (a transport whose exchanges can be left in flight, the flat NCCL/gloo all-to-all):
  every count exchanged first and read by the host once per layer; then, per token chunk (``overlap_chunks``),
  the rows travel while another chunk's experts compute, forward and backward.
* :class:`PlannedDispatcher` (a transport that plans its exchange: the hierarchical one, with or without node
  dedup): the phases one after the other around the transport's plan.

A token crosses the wire at most once per destination rank, however many of its k experts live there (once per
remote node with node dedup). All three share the expert stage (:func:`expert_stage`) and the fan-index row
movement of :mod:`piper_ds.ops.permute`. Exchanges can be observed by an :class:`ExchangeTimer` (the pipeline
timeline); the timer sees every exchange and never changes what is sent.
"""
from __future__ import annotations

import abc
from typing import Callable, List, Optional, Protocol, Tuple

import torch

from piper_ds.comm.alltoall import AsyncExchange
from piper_ds.moe.placement import ExpertPlacement
from piper_ds.ops import permute

Experts = Callable[..., torch.Tensor]  # (x_RD, pos_RK, num_rows, counts_L, offsets_L) -> y_ND (GroupedExperts)


class ExchangeTimer(Protocol):
    """Observes a dispatcher's exchanges (forward and, through autograd marks, backward)."""

    def counts(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Runs the counts exchange ``run()`` and returns its result."""

    def exchange(self, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Runs the synchronous exchange ``run(x)`` and returns its rows."""

    def started(self, x: torch.Tensor, start: Callable[[torch.Tensor], AsyncExchange]):
        """Starts the exchange ``start(x)``; returns an object whose ``wait()`` gives its rows."""


class Dispatcher(abc.ABC):
    """Base of the dispatchers: the placement, the experts' backend and the optional exchange timer."""

    def __init__(self, placement: ExpertPlacement, backend: str):
        self.placement, self.backend = placement, backend
        self.timer: Optional[ExchangeTimer] = None

    @abc.abstractmethod
    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 experts: Experts, bounded: bool) -> torch.Tensor:
        """x_TD [T, D], topk_idx_TK int64 [T, K] (-1 = dropped), topk_weights_TK fp32 [T, K] -> out_TD [T, D], the
        weighted expert outputs of every token.
        ``bounded``: assignments may be dropped (a capacity), so the local row count is not T * K."""


def expert_stage(x_RD: torch.Tensor, slots_RK: torch.Tensor, weights_RK: torch.Tensor, num_local: int,
                 experts: Experts, backend: str, num_rows: Optional[int] = None, bounded: bool = False,
                 slot_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows x_RD whose (slot, weight) pairs name local experts -> sum_k weight * expert_slot(row): [R, D].

    ``slots_RK`` local slots (-1: none), or expert ids read through ``slot_map``; ``num_rows``/``bounded`` as in
    :func:`piper_ds.ops.permute.route_plan` (either keeps the host from waiting for the device).
    """
    plan = permute.route_plan(slots_RK, num_local, slot_map, backend, num_rows=num_rows, bounded=bounded)
    y_ND = experts(x_RD, plan.pos_RK, plan.row_N.numel(), plan.counts_L, plan.offsets_L)
    # an exact plan's rows are all some pair's; a bounded plan's tail is nobody's and gets zero gradient
    return permute.reduce_rows(y_ND, plan.pos_RK, weights_RK, backend, all_covered=not bounded)


class LocalDispatcher(Dispatcher):
    """ep_size 1: the experts are all here; nothing is exchanged and the host never waits for the device."""

    def __call__(self, x_TD, topk_idx_TK, topk_weights_TK, experts, bounded) -> torch.Tensor:
        T, K = topk_idx_TK.shape
        out = expert_stage(x_TD, topk_idx_TK, topk_weights_TK, self.placement.num_local, experts, self.backend,
                           num_rows=None if bounded else T * K, bounded=bounded, slot_map=self.placement.slot_of)
        return out


# ------------------------------------------------------------------------------------------- shared pieces
def _send_side(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
               placement: ExpertPlacement, backend: str, num_rows: Optional[int] = None):
    """Send plan, the rows to send [S, D] (rank-major) and their routing metadata [S, 2K] fp32 (slot, weight;
    slots < 2**24 are exact in fp32, and one exchange saves a launch)."""
    plan = permute.send_plan(topk_idx_TK, topk_weights_TK, placement.rank_of, placement.slot_of, placement.ep_size,
                             backend, num_rows=num_rows)
    x_send = permute.expand_rows(x_TD, plan.pos_TR, plan.token_idx_S.numel(), backend)
    meta = torch.cat([plan.slots_SK.to(torch.float32), plan.weights_SK.float()], dim=1)
    return plan, x_send, meta


def _split_meta(meta_RK2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    K = meta_RK2.shape[1] // 2
    return meta_RK2[:, :K].detach().round().to(torch.int64), meta_RK2[:, K:]


# --------------------------------------------------------------------------------------------- flat
def chunk_counts(topk_idx_TK: torch.Tensor, placement: ExpertPlacement, chunks: int) -> torch.Tensor:
    """Per destination rank and chunk: (rows, pairs) to send, int64 [R, chunks, 2], on the device, no host wait.

    rows: tokens of the chunk with at least one expert on rank r (a token goes once per rank); pairs: the
    chunk's (token, expert) assignments on rank r, i.e. the rows rank r's experts compute. -1 = dropped.
    """
    R = placement.ep_size
    # dropped assignments go to a spare column R, cut off below; no op here waits for the device
    dest_TK = placement.rank_of[topk_idx_TK.clamp_min(0)].masked_fill(topk_idx_TK < 0, R)
    out = []
    for dest in dest_TK.tensor_split(chunks):
        rows = torch.zeros(dest.shape[0], R + 1, dtype=torch.int64, device=dest.device).scatter_(1, dest, 1).sum(0)
        pairs = torch.zeros(R + 1, dtype=torch.int64, device=dest.device).scatter_add_(
            0, dest.reshape(-1), torch.ones_like(dest.reshape(-1)))
        out.append(torch.stack([rows[:R], pairs[:R]], dim=1))
    return torch.stack(out, dim=1)


class _Done:
    """A finished exchange with :class:`~piper_ds.comm.alltoall.AsyncExchange`'s ``wait``."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def wait(self) -> torch.Tensor:
        rows, self.rows = self.rows, None  # hand the rows over: the caller decides how long they live
        return rows


class FlatDispatcher(Dispatcher):
    """Exchanges over a transport with in-flight exchanges (``start``), one host wait per layer.

    The tokens are cut into ``chunks`` contiguous chunks (the same number on every rank, empty ones included,
    so every rank makes the same collectives). (1) Counts on the device for every chunk and rank, one exchange,
    one wait: every later size is known. (2) Every chunk's send plan, rows and metadata on their way. (3) Per
    chunk: its rows' expert stage, outputs on their way back. (4) Per chunk: the returned rows summed per token.
    Chunk c + 1's rows travel while chunk c's experts compute; backward mirrors it (autograd reaches a chunk's
    ``wait`` node before its ``start``). With one chunk the exchanges are synchronous.
    """

    def __init__(self, placement: ExpertPlacement, backend: str, transport, chunks: int):
        super().__init__(placement, backend)
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.transport, self.chunks = transport, chunks

    def _counts(self, send: torch.Tensor) -> torch.Tensor:
        run = lambda: self.transport.exchange_counts(send)  # noqa: E731
        return run() if self.timer is None else self.timer.counts(run)

    def _start(self, x: torch.Tensor, send: List[int], recv: List[int]):
        if self.chunks == 1:  # nothing to overlap: the synchronous exchange (one autograd node, not two)
            run = lambda t: self.transport(t, send, recv)  # noqa: E731
            return _Done(run(x) if self.timer is None else self.timer.exchange(x, run))
        start = lambda t: self.transport.start(t, send, recv)  # noqa: E731
        return start(x) if self.timer is None else self.timer.started(x, start)

    def __call__(self, x_TD, topk_idx_TK, topk_weights_TK, experts, bounded) -> torch.Tensor:
        ep, C, L = self.placement.ep_size, self.chunks, self.placement.num_local
        send_dev = chunk_counts(topk_idx_TK, self.placement, C)
        send, recv = torch.stack([send_dev, self._counts(send_dev)]).tolist()  # the layer's one host wait
        rows = [([send[r][c][0] for r in range(ep)], [recv[r][c][0] for r in range(ep)]) for c in range(C)]
        pairs = [sum(recv[r][c][1] for r in range(ep)) for c in range(C)]
        parts = list(zip(x_TD.tensor_split(C), topk_idx_TK.tensor_split(C), topk_weights_TK.tensor_split(C)))
        # Each phase is a function so that its temporaries are freed when it returns, not when the layer does.
        sent = [self._gather_and_send(x_c, idx_c, w_c, s_c, r_c)
                for (x_c, idx_c, w_c), (s_c, r_c) in zip(parts, rows)]
        back = []
        for c, (s_c, r_c) in enumerate(rows):
            pos_TR, x_ex, meta_ex = sent[c]
            sent[c] = None
            back.append((pos_TR, self._experts_and_return(x_ex, meta_ex, pairs[c], s_c, r_c, L, experts)))
        # every returned row is one (token, rank)'s
        outs = [permute.reduce_rows(y_ex.wait(), pos_TR, None, self.backend, all_covered=True)
                for pos_TR, y_ex in back]
        out = outs[0] if C == 1 else torch.cat(outs)
        return out

    def _gather_and_send(self, x_c, idx_c, w_c, send_c: List[int], recv_c: List[int]):
        plan, x_send, meta = _send_side(x_c, idx_c, w_c, self.placement, self.backend, num_rows=sum(send_c))
        return plan.pos_TR, self._start(x_send, send_c, recv_c), self._start(meta, send_c, recv_c)

    def _experts_and_return(self, x_ex, meta_ex, pairs: int, send_c: List[int], recv_c: List[int], L: int,
                            experts):
        x_recv = x_ex.wait()
        slots, weights = _split_meta(meta_ex.wait())
        y_recv = expert_stage(x_recv, slots, weights, L, experts, self.backend, num_rows=pairs)
        return self._start(y_recv, recv_c, send_c)


# ------------------------------------------------------------------------------------------- planned
class PlannedDispatcher(Dispatcher):
    """Exchanges over a transport that plans them (hierarchical, optionally with node dedup).

    The send plan waits for its row count; the transport's plan exchanges the counts (collective); the received
    pairs are counted on the device once more. With node dedup the rows travel once per (token, remote node)
    and come back summed per node (zeros in the token's other rows there): the per-token sum is unchanged. The
    metadata differs per destination rank, so it takes the plan without dedup.
    """

    def __init__(self, placement: ExpertPlacement, backend: str, transport):
        super().__init__(placement, backend)
        self.transport = transport

    def _send(self, x: torch.Tensor, send: List[int], recv: List[int], plan) -> torch.Tensor:
        run = lambda t: self.transport(t, send, recv, plan=plan)  # noqa: E731
        return run(x) if self.timer is None else self.timer.exchange(x, run)

    def __call__(self, x_TD, topk_idx_TK, topk_weights_TK, experts, bounded) -> torch.Tensor:
        plan, x_send, meta = _send_side(x_TD, topk_idx_TK, topk_weights_TK, self.placement, self.backend)
        send = plan.send_counts_R.tolist()
        caps = self.transport.capabilities
        source_ids = plan.token_idx_S if caps.node_dedup else None
        make = lambda: self.transport.plan(plan.send_counts_R.to(torch.int64), source_ids=source_ids)  # noqa: E731
        exchange = make() if self.timer is None else self.timer.counts(make)
        recv = [int(c) for c in exchange.recv_counts]
        x_recv = self._send(x_send, send, recv, exchange)
        meta_recv = self._send(meta, send, recv, exchange.without_dedup())
        del x_send, meta
        slots, weights = _split_meta(meta_recv)
        y_recv = expert_stage(x_recv, slots, weights, self.placement.num_local, experts, self.backend)
        y_back = self._send(y_recv, recv, send, exchange.reversed())
        out = permute.reduce_rows(y_back, plan.pos_TR, None, self.backend, all_covered=True)
        return out


def make_dispatcher(placement: ExpertPlacement, backend: str, transport=None, chunks: int = 1) -> Dispatcher:
    """The dispatcher for a layer: local at ep_size 1, else by what ``transport`` declares it can do."""
    if placement.ep_size == 1:
        return LocalDispatcher(placement, backend)
    if transport is None:
        raise ValueError(f"ep_size {placement.ep_size} needs a transport over the EP group")
    caps = transport.capabilities
    if caps.group_size != placement.ep_size:
        raise ValueError(f"the transport's group has {caps.group_size} ranks but ep_size is {placement.ep_size}")
    if caps.plans_exchange:
        return PlannedDispatcher(placement, backend, transport)
    if not caps.in_flight and chunks > 1:
        raise ValueError(f"overlap_chunks ({chunks}) needs a transport that leaves exchanges in flight")
    return FlatDispatcher(placement, backend, transport, chunks)
