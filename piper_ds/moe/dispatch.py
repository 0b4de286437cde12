"""Padding-free expert-parallel dispatch in phases, each a function a pipeline schedule can call on its own.

    preprocess   routing -> send plan: one row per (token, destination rank), rank-major; gather the rows
    dispatch     exchange counts, then rows and their (slot, weight) metadata over the transport
    postprocess  expand received rows to the local experts they asked for, grouped by local slot
    (experts)    grouped GEMM over the expanded rows
    combine      weighted sum per received row at the expert rank, one row back per (token, rank),
                 reverse exchange, scatter-add into the source tokens

A token crosses the wire at most once per destination rank however many of its k experts live there. All
the index work comes from :mod:`piper_ds.ops` (fused kernels when built, else the PyTorch references).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from piper_ds.comm.alltoall import Transport
from piper_ds.moe.placement import ExpertPlacement
from piper_ds.ops import reference


@dataclass
class Ops:
    """The kernels the dispatcher uses; defaults are the PyTorch references."""

    send_plan: object = reference.send_plan_reference
    expand_plan: object = reference.expand_plan_reference
    permute_rows: object = reference.permute_rows_reference
    combine_rows: object = reference.combine_rows_reference


@dataclass
class DispatchState:
    """What the later phases need from the earlier ones of the same micro-batch."""

    num_tokens: int
    token_idx_S: torch.Tensor
    send_counts: List[int]
    recv_counts: List[int]
    x_send_SD: Optional[torch.Tensor] = None
    meta_send_SK2: Optional[torch.Tensor] = None
    x_recv_RD: Optional[torch.Tensor] = None
    meta_recv_RK2: Optional[torch.Tensor] = None
    row_idx_N: Optional[torch.Tensor] = None
    weight_N: Optional[torch.Tensor] = None
    tokens_per_slot_L: Optional[torch.Tensor] = None


def preprocess(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
               placement: ExpertPlacement, transport: Transport, ops: Ops) -> DispatchState:
    """Builds the send plan, gathers the rows to send and exchanges row counts with the EP group."""
    plan = ops.send_plan(topk_idx_TK, topk_weights_TK, placement.rank_of, placement.slot_of, placement.ep_size)
    # (slot, weight) travel as one fp32 tensor: slots < 2**24 are exact in fp32 and one exchange saves a launch
    meta = torch.cat([plan.slots_SK.to(torch.float32), plan.weights_SK.float()], dim=1)
    recv_counts = transport.exchange_counts(plan.send_counts_R.to(torch.int64))
    counts = torch.stack([plan.send_counts_R.to(torch.int64), recv_counts]).tolist()  # one host sync
    state = DispatchState(x_TD.shape[0], plan.token_idx_S, counts[0], counts[1])
    state.x_send_SD = ops.permute_rows(x_TD, plan.token_idx_S)
    state.meta_send_SK2 = meta
    return state


def dispatch(state: DispatchState, transport: Transport) -> DispatchState:
    """Sends the rows and their routing metadata to the expert ranks."""
    state.x_recv_RD = transport(state.x_send_SD, state.send_counts, state.recv_counts)
    state.meta_recv_RK2 = transport(state.meta_send_SK2, state.send_counts, state.recv_counts)
    state.x_send_SD = state.meta_send_SK2 = None  # free the send buffers early
    return state


def postprocess(state: DispatchState, num_local: int, ops: Ops) -> torch.Tensor:
    """Expands received rows to (row, local expert) pairs grouped by slot; returns the expert input [N, D]."""
    K = state.meta_recv_RK2.shape[1] // 2
    slots = state.meta_recv_RK2[:, :K].detach().round().to(torch.int64)
    plan = ops.expand_plan(slots, state.meta_recv_RK2[:, K:], num_local)
    state.row_idx_N, state.weight_N, state.tokens_per_slot_L = plan.row_idx_N, plan.weight_N, plan.tokens_per_slot_L
    return ops.permute_rows(state.x_recv_RD, plan.row_idx_N)


def combine(state: DispatchState, y_ND: torch.Tensor, transport: Transport, ops: Ops) -> torch.Tensor:
    """Weighted per-row sum at the expert rank, reverse exchange, scatter-add per source token: [T, D]."""
    y_recv = ops.combine_rows(y_ND, state.row_idx_N, state.x_recv_RD.shape[0], state.weight_N)
    y_back = transport(y_recv, state.recv_counts, state.send_counts)
    return ops.combine_rows(y_back, state.token_idx_S, state.num_tokens)
