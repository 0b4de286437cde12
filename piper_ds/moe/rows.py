"""Row movement of the dispatcher without atomics: gathers whose backward, and weighted combines whose forward,
write each row to a unique slot of a dense ``[rows, fan, D]`` buffer and reduce over ``fan``.

Every (destination row, j) pair occurs at most once in the dispatcher's plans: a source token goes at most
once to each EP rank (fan = ep_size, position = token * ep_size + rank) and a received row asks at most once
for each of its k experts (fan = k, position = row * K + k). So a scatter-add can be a plain scatter into
distinct positions followed by a dense reduction: deterministic, and on GPUs far faster than atomic
``index_add_``. The dense buffer is transient (never kept for backward). When it would be much larger than
the rows it holds (``rows * fan > DENSE_LIMIT * N``: wide EP groups with large k, where most slots of a
received row are empty) the ops fall back to ``index_add_`` in fp32.

Semantics equal :func:`piper_ds.ops.reference.permute_rows_reference` and ``combine_rows_reference``.
"""
from __future__ import annotations

from typing import Optional

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: at least fp32 (bf16/fp16 sums in fp32, float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


DENSE_LIMIT = 4  # largest rows * fan / N for which the dense buffer is used


def _scatter_dense(y_ND: torch.Tensor, pos_N: torch.Tensor, rows: int, fan: int) -> torch.Tensor:
    """buf[pos[n]] = y[n] in a zeroed [rows * fan, D] buffer, viewed as [rows, fan, D]."""
    buf = y_ND.new_zeros(rows * fan, y_ND.shape[1])
    buf.index_copy_(0, pos_N, y_ND)
    return buf.view(rows, fan, y_ND.shape[1])


def _sum_rows(y_ND: torch.Tensor, pos_N: torch.Tensor, rows: int, fan: int) -> torch.Tensor:
    """out[r] = sum of y[n] over pos[n] // fan == r, accumulated in >= fp32, returned in y's dtype."""
    if rows * fan <= DENSE_LIMIT * max(y_ND.shape[0], 1):
        return _scatter_dense(y_ND, pos_N, rows, fan).sum(dim=1, dtype=_acc(y_ND)).to(y_ND.dtype)
    out = torch.zeros(rows, y_ND.shape[1], dtype=_acc(y_ND), device=y_ND.device)
    return out.index_add_(0, torch.div(pos_N, fan, rounding_mode="floor"), y_ND.to(out.dtype)).to(y_ND.dtype)


class GatherRows(torch.autograd.Function):
    """out[n] = x[pos[n] // fan]; backward sums the gradient rows of each source row."""

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, pos_N: torch.Tensor, fan: int) -> torch.Tensor:
        ctx.save_for_backward(pos_N)
        ctx.rows, ctx.fan = x_RD.shape[0], fan
        return x_RD.index_select(0, torch.div(pos_N, fan, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (pos_N, ) = ctx.saved_tensors
        return _sum_rows(grad_ND.contiguous(), pos_N, ctx.rows, ctx.fan), None, None


def gather_rows(x_RD: torch.Tensor, pos_N: torch.Tensor, fan: int) -> torch.Tensor:
    """Rows ``x[pos // fan]`` ([N, D]); ``pos`` must hold distinct values below ``len(x) * fan``."""
    return GatherRows.apply(x_RD, pos_N, fan)


class CombineRows(torch.autograd.Function):
    """out[r] = sum over pos[n] // fan == r of weight[n] * y[n]; keeps only y (not the dense buffer) for
    backward, where grad_y = weight * grad_out[row] and grad_weight = <y, grad_out[row]> per row."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, pos_N: torch.Tensor, rows: int, fan: int,
                weight_N: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.fan = fan
        if weight_N is None:
            ctx.save_for_backward(pos_N)
            return _sum_rows(y_ND, pos_N, rows, fan)
        ctx.save_for_backward(pos_N, y_ND, weight_N)
        return _sum_rows(y_ND * weight_N.to(y_ND.dtype)[:, None], pos_N, rows, fan)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        saved = ctx.saved_tensors  # read once: non-reentrant checkpointing refuses a second unpack
        pos_N = saved[0]
        g_ND = grad_RD.index_select(0, torch.div(pos_N, ctx.fan, rounding_mode="floor"))
        if len(saved) == 1:
            return g_ND, None, None, None, None
        _, y_ND, weight_N = saved
        grad_y = g_ND * weight_N.to(g_ND.dtype)[:, None] if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[4]:
            acc = _acc(y_ND)
            grad_w = (y_ND.to(acc) * g_ND.to(acc)).sum(dim=1).to(weight_N.dtype)
        return grad_y, None, None, None, grad_w


def combine_rows(y_ND: torch.Tensor, pos_N: torch.Tensor, rows: int, fan: int,
                 weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[r] = sum over n with pos[n] // fan == r of weight[n] * y[n]: [rows, D] in y's dtype.

    The reduction over ``fan`` accumulates in at least fp32; weights are applied in y's dtype.
    Differentiable in y and weight (``pos`` must hold distinct values below ``rows * fan``).
    """
    return CombineRows.apply(y_ND, pos_N, rows, fan, weight_N)
