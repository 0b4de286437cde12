"""The plans of the MoE dispatch: which rows go where, and the fan index that brings them back.

A *fan index* ``pos_RK`` [R, K] maps each of R wide rows to the K rows it owns in an expanded tensor (-1: none);
no two entries share an expanded row. :func:`piper_ds.ops.permute.expand_rows` copies wide rows out along it and
:func:`piper_ds.ops.permute.reduce_rows` sums them back (weighted), both without atomics. Shapes: T tokens, K
top-k, R ranks of the EP group, S sent rows, N expanded rows, L local experts.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class SendPlan(NamedTuple):
    """Where this rank's token rows go: one row per (token, destination rank), rank-major, token order.

    token_idx_S: int64 source token of every sent row.
    send_counts_R: int64 rows sent to each rank of the EP group.
    slots_SK: int64 for each sent row, the destination-local slot of each of the token's K experts that
        lives on that rank, -1 elsewhere (and for dropped assignments).
    weights_SK: float32 the matching combine weights, 0 where the slot is -1 (differentiable).
    pos_TR: int64 [T, R] fan index: the sent row of (token, rank), -1 where the token sends nothing there.
    """

    token_idx_S: torch.Tensor
    send_counts_R: torch.Tensor
    slots_SK: torch.Tensor
    weights_SK: torch.Tensor
    pos_TR: torch.Tensor


class RoutePlan(NamedTuple):
    """The (row, k) pairs bound for this rank's experts, grouped by local slot (stable in (row, k) order).

    row_N: int64 the wide row (token or received row) of each expanded row.
    pair_N: int64 its flat (row * K + k) position in the [R, K] routing.
    pos_RK: int64 [R, K] fan index: the expanded row of pair (r, k), -1 where the pair is not for this rank.
    counts_L: int64 expanded rows per local slot.
    offsets_L: int32 inclusive ends of the slots' groups (``torch._grouped_mm``'s ``offs``).
    In a bounded plan row_N and pair_N have one entry per pair, -1 past ``offsets_L[-1]``.
    """

    row_N: torch.Tensor
    pair_N: torch.Tensor
    pos_RK: torch.Tensor
    counts_L: torch.Tensor
    offsets_L: torch.Tensor
