"""Token permutation for MoE dispatch: plans (counting sorts) and row movement along fan indices, with autograd.

Each function computes exactly its reference in :mod:`piper_ds.ops.reference` and picks its implementation by
``backend`` ("auto" | "cuda" | "cpu" | "reference", see ``op_builder/loader.py``); the plan types and the fan
index are described in :mod:`piper_ds.ops.plans`.

* :func:`send_plan` (ep > 1): one row per (token, destination rank), and the fan index ``pos_TR``;
* :func:`route_plan`: the (row, k) pairs bound for the local experts, grouped by slot, with their fan index
  ``pos_RK`` and the grouped GEMM's int32 offsets. At ep = 1 it reads the router's top-k through the placement's
  slot map, so nothing else runs between the router and the experts;
* :func:`expand_rows` (out[pos[r, k]] = x[r]) and :func:`reduce_rows` (out[r] = sum_k w[r, k] * y[pos[r, k]]):
  each one launch forward and one launch backward, no atomics, deterministic.

Plans can be built without waiting for the device: pass ``num_rows`` when the row count is known (the
dispatcher exchanges it with the counts), or ``bounded=True`` (route_plan) to allocate one row per pair. Rows that
no pair points at (a bounded plan's tail) are left unwritten by the CUDA kernels: they are never read.

Shapes: T tokens, K top-k, E experts, R ranks / wide rows, S sent rows, N expanded rows, D model dim, L local
experts.
"""
from __future__ import annotations

from typing import Optional

import torch

from piper_ds.ops.compiled import compiled_op
from piper_ds.ops.plans import RoutePlan, SendPlan
from piper_ds.ops.reference import (expand_rows_reference, reduce_rows_reference, route_plan_reference,
                                    send_plan_reference)

__all__ = ["send_plan", "route_plan", "check_fan", "expand_rows", "reduce_rows", "SendPlan", "RoutePlan"]

_MAX_FAN = 32  # the row kernels stage a row's fan in one warp


def _check_num_rows(num_rows: Optional[int]) -> int:
    """-1 for None (count on the device), else the non-negative int."""
    if num_rows is None:
        return -1
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be None or an int >= 0, got {num_rows!r}")
    return num_rows


def _check_known(rows: int, known: int, what: str) -> None:
    if known >= 0 and rows != known:
        raise ValueError(f"{what}: num_rows is {known} but the plan has {rows} rows")


def _check_rows(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")


def _check_pos(pos_RK: torch.Tensor, rows: int, rows_name: str) -> None:
    if not isinstance(pos_RK, torch.Tensor) or pos_RK.dtype != torch.int64:
        raise TypeError(f"pos_RK must be an int64 torch.Tensor, got "
                        f"{pos_RK.dtype if isinstance(pos_RK, torch.Tensor) else type(pos_RK).__name__}")
    if pos_RK.dim() != 2 or pos_RK.shape[1] > _MAX_FAN:
        raise ValueError(f"pos_RK must be 2-D [rows, fan] with fan <= {_MAX_FAN}, got shape {tuple(pos_RK.shape)}")
    if pos_RK.shape[0] != rows:
        raise ValueError(f"pos_RK has {pos_RK.shape[0]} rows but {rows_name} has {rows}")


# ------------------------------------------------------------------------------------------------ plans
def send_plan(topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor, expert_rank_E: torch.Tensor,
              expert_slot_E: torch.Tensor, ep_size: int, backend: str = "auto",
              num_rows: Optional[int] = None) -> SendPlan:
    """One row per (token, destination rank) pair, rank-major then token order (see ``send_plan_reference``).

    topk_idx_TK int64 [T, K] (-1 = dropped), topk_weights_TK [T, K], expert_rank_E / expert_slot_E int [E].
    Returns SendPlan(token_idx_S, send_counts_R, slots_SK, weights_SK, pos_TR); weights_SK is differentiable.
    ``num_rows``: S when the caller knows it (the sum of the row counts it already exchanged). The CUDA op then
    allocates without waiting for the device and skips its input validation; the CPU op and the reference check
    it against their own count (ValueError when they differ).
    """
    if topk_idx_TK.dtype != torch.int64 or topk_idx_TK.dim() != 2:
        raise TypeError(f"topk_idx_TK must be int64 [T, K], got {topk_idx_TK.dtype} {tuple(topk_idx_TK.shape)}")
    if tuple(topk_weights_TK.shape) != tuple(topk_idx_TK.shape):
        raise ValueError(f"topk_weights_TK {tuple(topk_weights_TK.shape)} must match topk_idx_TK "
                         f"{tuple(topk_idx_TK.shape)}")
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    known = _check_num_rows(num_rows)
    op = compiled_op("permute", topk_idx_TK.device, backend)
    if op is None:
        plan = send_plan_reference(topk_idx_TK, topk_weights_TK, expert_rank_E, expert_slot_E, ep_size)
        _check_known(plan.token_idx_S.numel(), known, "send_plan")
        return plan
    token_S, counts_R, slots_SK, pos_TR = op.send_plan(topk_idx_TK, expert_rank_E, expert_slot_E, int(ep_size),
                                                       known)
    weights_SK = topk_weights_TK.index_select(0, token_S) * (slots_SK >= 0)
    return SendPlan(token_S, counts_R, slots_SK, weights_SK, pos_TR)


def route_plan(ids_RK: torch.Tensor, num_local: int, slot_map: Optional[torch.Tensor] = None, backend: str = "auto",
               num_rows: Optional[int] = None, bounded: bool = False) -> RoutePlan:
    """Groups the (row, k) pairs of ``ids_RK`` by local slot, stable in (row, k) order (see :class:`RoutePlan`).

    ids_RK int64 [R, K]: local slots (-1 = not here), or expert ids read through ``slot_map`` int64 [E] (entries
    < 0: experts held elsewhere). ``num_rows``: the number of pairs for this rank when the caller knows it (no
    wait on the device; the CUDA op trusts it). ``bounded``: allocate one row per pair instead (no wait; row_N
    and pair_N are -1 past ``offsets_L[-1]``). Without either, the CUDA op waits once for the count.
    """
    if not isinstance(ids_RK, torch.Tensor) or ids_RK.dtype != torch.int64 or ids_RK.dim() != 2:
        raise TypeError(f"ids_RK must be an int64 [R, K] tensor, got "
                        f"{ids_RK.dtype if isinstance(ids_RK, torch.Tensor) else type(ids_RK).__name__} "
                        f"{tuple(getattr(ids_RK, 'shape', ()))}")
    if num_local < 1:
        raise ValueError(f"num_local must be >= 1, got {num_local}")
    if slot_map is not None and (slot_map.dtype != torch.int64 or slot_map.dim() != 1):
        raise TypeError(f"slot_map must be int64 [E], got {slot_map.dtype} {tuple(slot_map.shape)}")
    known = _check_num_rows(num_rows)
    if known >= 0 and bounded:
        raise ValueError(f"num_rows ({num_rows}) and bounded=True exclude each other")
    op = compiled_op("permute", ids_RK.device, backend)
    if op is None:
        plan = route_plan_reference(ids_RK, num_local, slot_map, bounded)
        if not bounded:
            _check_known(plan.row_N.numel(), known, "route_plan")
        return plan
    return RoutePlan(*op.route_plan(ids_RK, slot_map, int(num_local), known, bool(bounded)))


# ------------------------------------------------------------------------------------------ row movement
class _ExpandRows(torch.autograd.Function):
    """out[pos[r, k]] = x[r]; backward: grad_x[r] = sum_k grad_out[pos[r, k]] (a reduce without weights)."""

    @staticmethod
    def forward(ctx, x, pos, num_rows, op):
        ctx.save_for_backward(pos)
        ctx.op = op
        return op.expand_rows(x, pos, num_rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (pos, ) = ctx.saved_tensors
        return ctx.op.reduce_rows(grad_out.contiguous(), pos, None), None, None, None


class _ReduceRows(torch.autograd.Function):
    """out[r] = sum_k w[r, k] * y[pos[r, k]]; backward in one launch: grad_y[pos[r, k]] = w[r, k] * grad_out[r]
    and grad_w[r, k] = <y[pos[r, k]], grad_out[r]>. y is kept for backward only when the weight needs a gradient."""

    @staticmethod
    def forward(ctx, y, pos, weight, op, all_covered):
        ctx.need_w = weight is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(y if ctx.need_w else None, pos, weight)
        ctx.num_rows, ctx.op, ctx.all_covered = y.shape[0], op, all_covered
        return op.reduce_rows(y, pos, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        y, pos, weight = ctx.saved_tensors
        grad_y, grad_w = ctx.op.reduce_rows_backward(grad_out.contiguous(), y, pos, weight, ctx.num_rows,
                                                     ctx.needs_input_grad[0], ctx.need_w, ctx.all_covered)
        return grad_y, None, grad_w, None, None


def _differentiable(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_fan(x_RD: torch.Tensor, pos_RK: torch.Tensor, num_rows: int) -> None:
    """ValueError/TypeError naming the values unless ``expand_rows(x_RD, pos_RK, num_rows)`` is well formed."""
    _check_rows(x_RD, "x_RD")
    _check_pos(pos_RK, x_RD.shape[0], "x_RD")
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")


def expand_rows(x_RD: torch.Tensor, pos_RK: torch.Tensor, num_rows: int, backend: str = "auto") -> torch.Tensor:
    """Copies wide rows out along a fan index: out[pos[r, k]] = x[r] for pos >= 0. x [R, D] -> [num_rows, D].

    Differentiable in x. Rows no pair points at are zero in the reference and on the CPU, unwritten on the GPU.
    """
    check_fan(x_RD, pos_RK, num_rows)
    op = compiled_op("permute", x_RD.device, backend)
    if op is None:
        return expand_rows_reference(x_RD, pos_RK, num_rows)
    if not _differentiable(x_RD):
        return op.expand_rows(x_RD, pos_RK, num_rows)
    return _ExpandRows.apply(x_RD, pos_RK, num_rows, op)


def reduce_rows(y_ND: torch.Tensor, pos_RK: torch.Tensor, weight_RK: Optional[torch.Tensor] = None,
                backend: str = "auto", all_covered: bool = False) -> torch.Tensor:
    """Sums rows back along a fan index: out[r] = sum_k weight[r, k] * y[pos[r, k]] (pos >= 0; k in order).

    y [N, D], pos_RK int64 [R, K], weight_RK [R, K] or None -> [R, D] in y's dtype, accumulated in fp32 (fp64
    for fp64 rows). Differentiable in y and the weight; rows of y no pair points at get zero gradient.
    ``all_covered``: the caller vouches that every row of y is some pair's (an exact plan), so the CUDA backward
    skips zeroing the gradient first.
    """
    _check_rows(y_ND, "y_ND")
    _check_pos(pos_RK, pos_RK.shape[0], "pos_RK")
    if weight_RK is not None and tuple(weight_RK.shape) != tuple(pos_RK.shape):
        raise ValueError(f"weight_RK must have pos_RK's shape {tuple(pos_RK.shape)}, got {tuple(weight_RK.shape)}")
    op = compiled_op("permute", y_ND.device, backend)
    if op is None:
        return reduce_rows_reference(y_ND, pos_RK, weight_RK)
    if not _differentiable(y_ND, weight_RK):
        return op.reduce_rows(y_ND, pos_RK, weight_RK)
    return _ReduceRows.apply(y_ND, pos_RK, weight_RK, op, bool(all_covered))
