"""Token permutation for MoE dispatch: send/expand plans (counting sorts) and row gather/combine with autograd.

Each function computes exactly its reference in :mod:`piper_ds.ops.reference` and picks its implementation by
``backend`` ("auto" | "cuda" | "cpu" | "reference", see ``op_builder/loader.py``). Extensions over the references:

* ``expand_plan(..., align=a)`` pads every local expert's group to a multiple of ``a`` rows for grouped GEMMs;
  padding rows have ``row_idx_N == pair_N == -1`` and weight 0, and ``tokens_per_slot_L`` holds the padded sizes
  (the real counts are ``(row_idx_N >= 0)`` per group);
* an index of -1 in ``permute_rows`` gives a zero row, and in ``combine_rows`` skips that input row;
* fp64 rows accumulate in fp64 (gradcheck); every other dtype accumulates in fp32, as the reference does;
* ``combine_index(index, num_out)`` builds the inverse of a row index (a CSR, :class:`RowInverse`) that
  ``combine_rows(..., inverse=)`` and the backward of ``permute_rows(..., inverse=)`` read. Build it once per
  plan: every combine over that index (the forward combine, and the gather's backward) is then one kernel launch
  instead of the inverse's build (about four launches) plus the combine. Without it each call builds its own.
  The inverse is trusted: it must be ``combine_index`` of the same index and row count (checked: shapes, dtype,
  device). The reference backend ignores it.

Shapes: T tokens, K top-k, E experts, R ranks, S sent rows, N expanded rows, D model dim, L local experts.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from piper_ds.ops.reference import (ExpandPlan, RowInverse, SendPlan, combine_index_reference, combine_rows_reference,
                                    expand_plan_reference, permute_rows_reference, send_plan_reference)

__all__ = ["send_plan", "expand_plan", "combine_index", "permute_rows", "combine_rows", "SendPlan", "ExpandPlan",
           "RowInverse"]


def _get_op(device: torch.device, backend: str):
    try:
        from piper_ds.op_builder import loader
    except ImportError:  # a source checkout that is not pip-installed: op_builder/ is top level
        from op_builder import loader
    return loader.get_op("permute", device.type, backend)


def _check_index(index: torch.Tensor, name: str = "index") -> None:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 torch.Tensor, got "
                        f"{index.dtype if isinstance(index, torch.Tensor) else type(index).__name__}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")


def _check_rows(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")


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


def _inverse_args(inverse: Optional[RowInverse], index: torch.Tensor, num_out: int) -> Tuple:
    """(starts, rows) for the op, or (None, None); checks what is cheap to check (type, shapes, device)."""
    if inverse is None:
        return None, None
    if not isinstance(inverse, RowInverse):
        raise TypeError(f"inverse must be a RowInverse (from combine_index), got {type(inverse).__name__}")
    starts, rows = inverse
    if tuple(starts.shape) != (num_out + 1,) or tuple(rows.shape) != tuple(index.shape):
        raise ValueError(f"inverse has shapes {tuple(starts.shape)} and {tuple(rows.shape)}, expected "
                         f"({num_out + 1},) and {tuple(index.shape)}: build it with combine_index(index, {num_out})")
    if starts.device != index.device or rows.device != index.device:
        raise ValueError(f"inverse ({starts.device}) and index ({index.device}) must be on the same device")
    return starts, rows


# ------------------------------------------------------------------------------------------------ plans
def send_plan(topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor, expert_rank_E: torch.Tensor,
              expert_slot_E: torch.Tensor, ep_size: int, backend: str = "auto",
              num_rows: Optional[int] = None) -> SendPlan:
    """One row per (token, destination rank) pair, rank-major then token order (see ``send_plan_reference``).

    topk_idx_TK int64 [T, K] (-1 = dropped), topk_weights_TK [T, K], expert_rank_E / expert_slot_E int [E].
    Returns SendPlan(token_idx_S, send_counts_R, slots_SK, weights_SK); weights_SK is differentiable.
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
    op = _get_op(topk_idx_TK.device, backend)
    if op is None:
        plan = send_plan_reference(topk_idx_TK, topk_weights_TK, expert_rank_E, expert_slot_E, ep_size)
        _check_known(plan.token_idx_S.numel(), known, "send_plan")
        return plan
    token_S, counts_R, slots_SK = op.send_plan(topk_idx_TK, expert_rank_E, expert_slot_E, int(ep_size), known)
    weights_SK = topk_weights_TK.index_select(0, token_S) * (slots_SK >= 0)
    return SendPlan(token_S, counts_R, slots_SK, weights_SK)


def _pad_groups(plan: ExpandPlan, align: int) -> ExpandPlan:
    """PyTorch padding of each group to a multiple of ``align`` rows (-1 rows, weight 0)."""
    counts = plan.tokens_per_slot_L
    padded = (counts + align - 1) // align * align
    start, pstart = counts.cumsum(0) - counts, padded.cumsum(0) - padded
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    pos = torch.arange(plan.row_idx_N.numel(), device=counts.device) - start[group] + pstart[group]
    total = int(padded.sum())
    row = plan.row_idx_N.new_full((total,), -1).index_copy(0, pos, plan.row_idx_N)
    weight = plan.weight_N.new_zeros(total).index_copy(0, pos, plan.weight_N)
    pair = plan.pair_N.new_full((total,), -1).index_copy(0, pos, plan.pair_N)
    return ExpandPlan(row, weight, padded, pair)


def expand_plan(slots_RK: torch.Tensor, weights_RK: torch.Tensor, num_local: int, align: int = 1,
                backend: str = "auto", num_rows: Optional[int] = None) -> ExpandPlan:
    """Expands received rows to their local experts, grouped by local slot (see ``expand_plan_reference``).

    slots_RK int64 [R, K] (or [R]) with -1 = not for this rank, weights_RK the matching weights, num_local L.
    ``align > 1`` pads each group to a multiple of ``align`` rows (row -1, weight 0; padded sizes returned).
    Returns ExpandPlan(row_idx_N int64, weight_N (differentiable), tokens_per_slot_L int64, pair_N int64):
    pair_N is the flat (row * K + k) position of each expanded row (-1 on padding rows).
    ``num_rows``: N when the caller knows it (align 1 only), as in :func:`send_plan`.
    """
    if slots_RK.dtype != torch.int64:
        raise TypeError(f"slots_RK must be int64, got {slots_RK.dtype}")
    if tuple(weights_RK.shape) != tuple(slots_RK.shape):
        raise ValueError(f"weights_RK {tuple(weights_RK.shape)} must match slots_RK {tuple(slots_RK.shape)}")
    if num_local < 1:
        raise ValueError(f"num_local must be >= 1, got {num_local}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    known = _check_num_rows(num_rows)
    if known >= 0 and align != 1:
        raise ValueError(f"num_rows ({num_rows}) can only be given with align 1, got align {align}")
    op = _get_op(slots_RK.device, backend)
    if op is None:
        plan = expand_plan_reference(slots_RK, weights_RK, num_local)
        if plan.tokens_per_slot_L.numel() != num_local:
            raise ValueError(f"slots_RK holds a slot >= num_local ({num_local})")
        _check_known(plan.row_idx_N.numel(), known, "expand_plan")
        return _pad_groups(plan, align) if align > 1 else plan
    row_N, pair_N, per_slot_L = op.expand_plan(slots_RK, int(num_local), int(align), known)
    flat = weights_RK.reshape(-1)
    if align > 1:
        weight_N = torch.where(pair_N >= 0, flat.index_select(0, pair_N.clamp_min(0)), flat.new_zeros(()))
    else:
        weight_N = flat.index_select(0, pair_N)
    return ExpandPlan(row_N, weight_N, per_slot_L, pair_N)


# ------------------------------------------------------------------------------------------ row movement
def combine_index(index: torch.Tensor, num_out: int, backend: str = "auto") -> RowInverse:
    """The inverse of ``index`` over ``num_out`` output rows (see :class:`RowInverse`), built once per plan.

    index int64 [N] with values in [-1, num_out). Pass the result as ``inverse=`` to every ``combine_rows`` over
    this index and to ``permute_rows`` gathering from ``num_out`` rows by it (its backward is such a combine).
    The CUDA op lists the rows of an output row in any order (the combine sorts up to 32 of them); the CPU op and
    the reference list them in ascending order.
    """
    _check_index(index)
    if num_out < 0:
        raise ValueError(f"num_out must be >= 0, got {num_out}")
    op = _get_op(index.device, backend)
    if op is None:
        if index.numel() and not (int(index.min()) >= -1 and int(index.max()) < num_out):
            raise IndexError(f"combine_index: index values must lie in [-1, {num_out}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        return combine_index_reference(index, num_out)
    return RowInverse(*op.combine_index(index, int(num_out)))


class _PermuteRows(torch.autograd.Function):
    """out[s] = x[index[s]]; backward: grad_x = combine(grad_out, index) without weights, one launch when the
    inverse of index is given."""

    @staticmethod
    def forward(ctx, x, index, starts, rows, op):
        ctx.save_for_backward(index, starts, rows)
        ctx.num_rows, ctx.op = x.shape[0], op
        return op.gather_rows(x, index, None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        index, starts, rows = ctx.saved_tensors
        return ctx.op.combine_rows(grad_out, index, ctx.num_rows, None, starts, rows), None, None, None, None


class _CombineRows(torch.autograd.Function):
    """out[index[n]] += w[n] * y[n]; backward in one launch: grad_y = w * grad_out[index] and
    grad_w[n] = <y[n], grad_out[index[n]]>. y is kept for backward only when the weight needs a gradient."""

    @staticmethod
    def forward(ctx, y, index, num_out, weight, starts, rows, op):
        ctx.need_w = weight is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(y if ctx.need_w else None, index, weight)
        ctx.op = op
        return op.combine_rows(y, index, num_out, weight, starts, rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        y, index, weight = ctx.saved_tensors
        grad_y, grad_w = ctx.op.combine_rows_backward(grad_out, y, index, weight, ctx.needs_input_grad[0],
                                                      ctx.need_w)
        return grad_y, None, None, grad_w, None, None, None


def permute_rows(x: torch.Tensor, index: torch.Tensor, backend: str = "auto",
                 inverse: Optional[RowInverse] = None) -> torch.Tensor:
    """Gathers rows: out[s] = x[index[s]] (zero row where index is -1). x [M, D], index int64 [S] -> [S, D].

    ``inverse``: ``combine_index(index, M)``, read by the backward (a combine over index) instead of building it.
    """
    _check_rows(x, "x")
    _check_index(index)
    op = _get_op(x.device, backend)
    if op is not None:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return op.gather_rows(x, index, None)
        starts, rows = _inverse_args(inverse, index, x.shape[0])
        return _PermuteRows.apply(x, index, starts, rows, op)
    valid = index >= 0
    return permute_rows_reference(x, index.clamp_min(0)).masked_fill(~valid[:, None], 0)


def combine_rows(y: torch.Tensor, index: torch.Tensor, num_out: int, weight: Optional[torch.Tensor] = None,
                 backend: str = "auto", inverse: Optional[RowInverse] = None) -> torch.Tensor:
    """Weighted scatter-add: out[index[n]] += weight[n] * y[n] (rows with index -1 skipped).

    y [N, D], index int64 [N], weight [N] or None -> [num_out, D] in y's dtype, accumulated in fp32.
    ``inverse``: ``combine_index(index, num_out)`` built once per plan; the combine is then one kernel launch.
    """
    _check_rows(y, "y")
    _check_index(index)
    if index.shape[0] != y.shape[0]:
        raise ValueError(f"index has {index.shape[0]} entries but y has {y.shape[0]} rows")
    if num_out < 0:
        raise ValueError(f"num_out must be >= 0, got {num_out}")
    if weight is not None and tuple(weight.shape) != (y.shape[0],):
        raise ValueError(f"weight must have shape ({y.shape[0]},), got {tuple(weight.shape)}")
    op = _get_op(y.device, backend)
    if op is not None:
        starts, rows = _inverse_args(inverse, index, int(num_out))
        needs_grad = y.requires_grad or (weight is not None and weight.requires_grad)
        if not (needs_grad and torch.is_grad_enabled()):
            return op.combine_rows(y, index, int(num_out), weight, starts, rows)
        return _CombineRows.apply(y, index, int(num_out), weight, starts, rows, op)
    if num_out == 0:
        if bool((index >= 0).any()):
            raise IndexError(f"combine_rows: num_out is 0 but index holds row {int(index.max())}")
        # no rows, but still on the graph: y (and the weight) get their zero gradients, as from the ops
        anchor = y.sum() * 0 + (weight.sum() * 0 if weight is not None else 0)
        return y.new_zeros(0, y.shape[1]) + anchor.to(y.dtype)
    invalid = index < 0
    w = None if weight is None else weight.masked_fill(invalid, 0)
    return combine_rows_reference(y.masked_fill(invalid[:, None], 0), index.clamp_min(0), num_out, w)
