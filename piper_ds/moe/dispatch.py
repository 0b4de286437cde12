"""Padding-free expert-parallel dispatch in phases, each a function a pipeline schedule can call on its own.

    preprocess   routing -> send plan: one row per (token, destination rank), rank-major; gather the rows
    dispatch     exchange counts, then rows and their (slot, weight) metadata over the transport
    postprocess  expand received rows to the local experts they asked for, grouped by local slot
    (experts)    grouped GEMM over the expanded rows
    combine      weighted sum per received row at the expert rank, one row back per (token, rank),
                 reverse exchange, scatter-add into the source tokens

A token crosses the wire at most once per destination rank however many of its k experts live there, and with
a node-dedup transport (``MoEConfig.node_dedup``) at most once per remote node. These phases serve
transports that plan their exchange (the hierarchical one); they wait for the device up to three times per layer
(the send plan's row count, the exchanged counts, the expanded row count). The flat transport runs the same
plans through :mod:`piper_ds.moe.overlapped`, which exchanges every count first and waits once. The fused
kernels of :mod:`piper_ds.ops` can replace the PyTorch planning (``Ops``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from piper_ds.comm.alltoall import Transport
from piper_ds.moe import rows
from piper_ds.moe.placement import ExpertPlacement
from piper_ds.ops import permute, reference


@dataclass
class Ops:
    """The planning kernels the dispatcher uses. None (the default) selects the built-in PyTorch planning
    below, which equals :func:`reference.send_plan_reference` / ``expand_plan_reference`` but waits on the
    device only where a size must reach the host. Row movement goes through :mod:`piper_ds.moe.rows`."""

    send_plan: object = None
    expand_plan: object = None
    rows_backend: Optional[str] = None  # fused row gather/combine (piper_ds.ops.permute) on this backend

    def gather(self, x_MD: torch.Tensor, pos_N: torch.Tensor, fan: int):
        """Rows ``x[pos // fan]`` and the handle that :meth:`combine` over the same rows takes."""
        if self.rows_backend is None:
            return rows.gather_rows(x_MD, pos_N, fan), (pos_N, fan, None)
        row_N = torch.div(pos_N, fan, rounding_mode="floor")
        # the inverse index (a CSR of the rows of each source row), built once: the gather's backward and the
        # combine over the same rows are then one launch each
        inverse = permute.combine_index(row_N, x_MD.shape[0], backend=self.rows_backend)
        return permute.permute_rows(x_MD, row_N, backend=self.rows_backend, inverse=inverse), (row_N, fan, inverse)

    def combine(self, y_ND: torch.Tensor, handle, num_out: int, weight_N: Optional[torch.Tensor] = None):
        """out[r] = sum of weight[n] * y[n] over the rows n that :meth:`gather` took from row r: [num_out, D]."""
        index_N, fan, inverse = handle
        if self.rows_backend is None:
            return rows.combine_rows(y_ND, index_N, num_out, fan, weight_N)
        return permute.combine_rows(y_ND, index_N, num_out, weight_N, backend=self.rows_backend, inverse=inverse)


def _send_plan(topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor, placement: ExpertPlacement):
    """``send_plan_reference`` in two halves: counts on the device now, rows once the host knows their number.

    Returns (send_counts_R, finish) where ``finish(num_rows)`` gives the SendPlan. No host sync inside.
    """
    T, K = topk_idx_TK.shape
    ep = placement.ep_size
    valid = topk_idx_TK >= 0
    safe = topk_idx_TK.clamp_min(0)
    dest_TK = torch.where(valid, placement.rank_of[safe], -1)
    # [T, ep + 1] hit map; column 0 collects dropped assignments and is discarded
    hits = torch.zeros(T, ep + 1, dtype=torch.bool, device=topk_idx_TK.device)
    hits.scatter_(1, dest_TK + 1, True)
    to_rank_RT = hits[:, 1:].t()
    send_counts_R = to_rank_RT.sum(dim=1)

    def finish(num_rows: int) -> reference.SendPlan:
        # stable sort puts the True entries of the rank-major [R, T] map first, in (rank, token) order
        flat = torch.argsort(to_rank_RT.reshape(-1).logical_not().to(torch.int8), stable=True)[:num_rows]
        rank_S, token_S = flat // T, flat % T
        here_SK = dest_TK[token_S] == rank_S[:, None]
        slots = torch.where(here_SK, placement.slot_of[safe[token_S]], -1)
        return reference.SendPlan(token_S, send_counts_R, slots, topk_weights_TK[token_S] * here_SK)

    return send_counts_R, finish


def _expand_plan(slots_RK: torch.Tensor, weights_RK: torch.Tensor, num_local: int,
                 num_rows: Optional[int] = None) -> reference.ExpandPlan:
    """``expand_plan_reference`` with a counting sort: one host sync for the number of expanded rows, unless the
    caller knows it (``num_rows``)."""
    flat_slot = slots_RK.reshape(-1)
    key = torch.where(flat_slot >= 0, flat_slot, num_local)  # dropped / elsewhere sort last
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=slots_RK.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    pair = torch.argsort(key, stable=True)
    n = int(flat_slot.numel() - counts[num_local]) if num_rows is None else num_rows  # host sync unless given
    pair = pair[:n]
    K = max(slots_RK.shape[1], 1)
    return reference.ExpandPlan(pair // K, weights_RK.reshape(-1)[pair], counts[:num_local], pair)


@dataclass
class DispatchState:
    """What the later phases need from the earlier ones of the same micro-batch."""

    num_tokens: int
    ep_size: int
    send_rows: Optional[tuple]  # Ops.gather's handle of the sent rows; None: the rows are the tokens
    send_counts: List[int]
    recv_counts: List[int]
    x_send_SD: Optional[torch.Tensor] = None
    meta_send_SK2: Optional[torch.Tensor] = None
    x_recv_RD: Optional[torch.Tensor] = None
    meta_recv_RK2: Optional[torch.Tensor] = None
    pair_rows: Optional[tuple] = None  # Ops.gather's handle of the expanded rows
    weight_N: Optional[torch.Tensor] = None
    tokens_per_slot_L: Optional[torch.Tensor] = None
    exchange_plan: Optional[object] = None  # the transport's own plan, when it makes one


def preprocess(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
               placement: ExpertPlacement, transport: Transport, ops: Ops) -> DispatchState:
    """Builds the send plan, gathers the rows to send and exchanges row counts with the EP group."""
    ep, T = placement.ep_size, x_TD.shape[0]
    if ops.send_plan is None:
        send_counts_R, finish = _send_plan(topk_idx_TK, topk_weights_TK, placement)
    else:
        plan = ops.send_plan(topk_idx_TK, topk_weights_TK, placement.rank_of, placement.slot_of, ep)
        send_counts_R, finish = plan.send_counts_R, (lambda _: plan)
    send_counts_R = send_counts_R.to(torch.int64)
    exchange_plan = rows_plan = None
    if getattr(transport, "node_dedup", False):  # the exchange plan needs each row's token: send plan first
        send_counts = send_counts_R.tolist()
        rows_plan = finish(sum(send_counts))
        exchange_plan = transport.plan(send_counts_R, source_ids=rows_plan.token_idx_S)
        counts = [send_counts, [int(c) for c in exchange_plan.recv_counts]]
    elif hasattr(transport, "plan"):  # a transport that plans its exchange once per micro-batch (hierarchical)
        exchange_plan = transport.plan(send_counts_R)
        counts = [send_counts_R.tolist(), [int(c) for c in exchange_plan.recv_counts]]
    else:
        recv_counts = transport.exchange_counts(send_counts_R)
        counts = torch.stack([send_counts_R, recv_counts]).tolist()  # host sync: the exchanged counts
    if rows_plan is None:
        rows_plan = finish(sum(counts[0]))
    x_send_SD, meta, handle = send_rows(x_TD, rows_plan, ep, ops)
    return DispatchState(T, ep, handle, counts[0], counts[1], x_send_SD=x_send_SD, meta_send_SK2=meta,
                         exchange_plan=exchange_plan)


def send_rows(x_TD: torch.Tensor, plan: reference.SendPlan, ep: int, ops: Ops):
    """The rows of ``plan`` to send and their routing metadata: (x_send [S, D], meta [S, 2K] fp32, handle).

    Rows are gathered rank-major (``handle``: :meth:`Ops.gather`'s, for the final per-token combine); at ep 1
    with every token sent they are the tokens themselves (``handle`` None, no copy). (slot, weight) travel as
    one fp32 tensor: slots < 2**24 are exact in fp32 and one exchange saves a launch.
    """
    sent = plan.token_idx_S.shape[0]
    meta = torch.cat([plan.slots_SK.to(torch.float32), plan.weights_SK.float()], dim=1)
    if ep == 1 and sent == x_TD.shape[0]:  # every token goes to the only rank, in token order
        return x_TD, meta, None
    rank_S = torch.repeat_interleave(torch.arange(ep, device=x_TD.device), plan.send_counts_R.to(torch.int64),
                                     output_size=sent)
    x_send_SD, handle = ops.gather(x_TD, plan.token_idx_S * ep + rank_S, ep)
    return x_send_SD, meta, handle


def _send(transport: Transport, x: torch.Tensor, send: List[int], recv: List[int], plan) -> torch.Tensor:
    return transport(x, send, recv) if plan is None else transport(x, send, recv, plan=plan)


def dispatch(state: DispatchState, transport: Transport) -> DispatchState:
    """Sends the rows and their routing metadata to the expert ranks.

    With a node-dedup plan the rows travel once per (token, node); the metadata differs per destination rank
    (its slots and weights are that rank's), so it takes the same exchange without dedup.
    """
    plan = state.exchange_plan
    state.x_recv_RD = _send(transport, state.x_send_SD, state.send_counts, state.recv_counts, plan)
    meta_plan = plan.without_dedup() if plan is not None and hasattr(plan, "without_dedup") else plan
    state.meta_recv_RK2 = _send(transport, state.meta_send_SK2, state.send_counts, state.recv_counts, meta_plan)
    state.x_send_SD = state.meta_send_SK2 = None  # free the send buffers early
    return state


def postprocess(state: DispatchState, num_local: int, ops: Ops) -> torch.Tensor:
    """Expands received rows to (row, local expert) pairs grouped by slot; returns the expert input [N, D]."""
    h_ND, state.pair_rows, plan = expand_received(state.x_recv_RD, state.meta_recv_RK2, num_local, ops)
    state.weight_N, state.tokens_per_slot_L = plan.weight_N, plan.tokens_per_slot_L
    return h_ND


def expand_received(x_recv_RD: torch.Tensor, meta_recv_RK2: torch.Tensor, num_local: int, ops: Ops,
                    num_rows: Optional[int] = None):
    """Received rows expanded to (row, local expert) pairs grouped by slot: (expert input [N, D], the gather's
    handle for the weighted combine, the ExpandPlan). ``num_rows``: N when known (no host sync for it)."""
    K = meta_recv_RK2.shape[1] // 2
    slots = meta_recv_RK2[:, :K].detach().round().to(torch.int64)
    if ops.expand_plan is None:
        plan = _expand_plan(slots, meta_recv_RK2[:, K:], num_local, num_rows=num_rows)
    else:
        plan = ops.expand_plan(slots, meta_recv_RK2[:, K:], num_local, num_rows=num_rows)
    h_ND, pair_rows = ops.gather(x_recv_RD, plan.pair_N, K)
    return h_ND, pair_rows, plan


def combine(state: DispatchState, y_ND: torch.Tensor, transport: Transport, ops: Ops) -> torch.Tensor:
    """Weighted per-row sum at the expert rank, reverse exchange, sum per source token: [T, D].

    With a node-dedup plan the reverse exchange sums a token's rows from the ranks of one node on that node and
    returns the sum in the token's first row for that node (zeros in its other rows there): the per-token sum
    below gives the same output, the additions grouped by node.
    """
    y_recv = ops.combine(y_ND, state.pair_rows, state.x_recv_RD.shape[0], state.weight_N)
    reverse = state.exchange_plan.reversed() if state.exchange_plan is not None else None
    y_back = _send(transport, y_recv, state.recv_counts, state.send_counts, reverse)
    if state.send_rows is None:
        return y_back
    return ops.combine(y_back, state.send_rows, state.num_tokens)

