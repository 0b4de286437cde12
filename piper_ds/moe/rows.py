"""Row movement of the dispatcher without atomics: gathers whose backward, and weighted combines whose forward,
write each row to a unique slot of a dense ``[rows, fan, D]`` buffer and reduce over ``fan``.

Every (destination row, j) pair occurs at most once in the dispatcher's plans: a source token goes at most
once to each EP rank (fan = ep_size, position = rank * T + token) and a received row asks at most once for
each of its k experts (fan = k, position = row * K + k). So a scatter-add can be a plain scatter into distinct
positions followed by a dense reduction: deterministic, and on GPUs far faster than atomic ``index_add_``.
The extra memory is one ``rows * fan * D`` buffer in the activation dtype.

Semantics equal :func:`piper_ds.ops.reference.permute_rows_reference` and ``combine_rows_reference``.
"""
from __future__ import annotations

from typing import Optional

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: at least fp32 (bf16/fp16 sums in fp32, float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _scatter_dense(y_ND: torch.Tensor, pos_N: torch.Tensor, rows: int, fan: int) -> torch.Tensor:
    """buf[pos[n]] = y[n] in a zeroed [rows * fan, D] buffer, viewed as [rows, fan, D]."""
    buf = y_ND.new_zeros(rows * fan, y_ND.shape[1])
    buf.index_copy_(0, pos_N, y_ND)
    return buf.view(rows, fan, y_ND.shape[1])


class GatherRows(torch.autograd.Function):
    """out[n] = x[pos[n] // fan]; backward sums the gradient rows of each source row densely."""

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, pos_N: torch.Tensor, fan: int) -> torch.Tensor:
        ctx.save_for_backward(pos_N)
        ctx.rows, ctx.fan = x_RD.shape[0], fan
        return x_RD.index_select(0, torch.div(pos_N, fan, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (pos_N, ) = ctx.saved_tensors
        grad = _scatter_dense(grad_ND.contiguous(), pos_N, ctx.rows, ctx.fan).sum(dim=1, dtype=_acc(grad_ND))
        return grad.to(grad_ND.dtype), None, None


def gather_rows(x_RD: torch.Tensor, pos_N: torch.Tensor, fan: int) -> torch.Tensor:
    """Rows ``x[pos // fan]`` ([N, D]); ``pos`` must hold distinct values below ``len(x) * fan``."""
    return GatherRows.apply(x_RD, pos_N, fan)


def combine_rows(y_ND: torch.Tensor, pos_N: torch.Tensor, rows: int, fan: int,
                 weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[r] = sum over n with pos[n] // fan == r of weight[n] * y[n]: [rows, D] in y's dtype.

    The reduction over ``fan`` accumulates in at least fp32; weights are applied in y's dtype (a bmm of
    ``[1, fan] @ [fan, D]`` per row was slower on GPUs: its kernels suit no such skinny shape).
    Differentiable in y and weight.
    """
    dense = _scatter_dense(y_ND, pos_N, rows, fan)
    if weight_N is None:
        return dense.sum(dim=1, dtype=_acc(y_ND)).to(y_ND.dtype)
    w = weight_N.new_zeros(rows * fan).index_copy(0, pos_N, weight_N).view(rows, fan, 1)
    return (dense * w.to(y_ND.dtype)).sum(dim=1, dtype=_acc(y_ND)).to(y_ND.dtype)
