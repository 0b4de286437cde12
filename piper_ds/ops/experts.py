"""The local experts' MLP over rows grouped by expert: y = act(x @ w_up[l]) @ w_down[l] for the rows of expert l.

``grouped_mlp`` picks one of three paths, all computing :func:`piper_ds.ops.reference.moe_reference`'s expert
function on the same rows:

* fused (CUDA, bf16, D and F multiples of 8, the activation op built): two ``torch._grouped_mm`` launches
  forward and four backward around the fused activation (:mod:`piper_ds.ops.activation`). Backward keeps only
  x and h (the up projection's output) and recomputes the activation in the activation's backward pass, so the
  activation itself is never stored. SwiGLU experts hold gate and up as one [L, D, 2F] weight (one GEMM);
* grouped (the same shapes with ``backend="reference"`` or without the activation op): PyTorch's autograd over
  ``torch._grouped_mm`` and the reference activation;
* loop (CPU, other dtypes, unaligned sizes): one matmul per expert, exact, what the CPU tests run.

``fanned_grouped_mlp`` (what the MoE layer runs) takes the rows before the dispatch's fan-out (x_RD and the fan
index of :func:`piper_ds.ops.permute.expand_rows`): on the fused path the expansion is part of the up
projection's node, whose backward keeps x_RD (usually kept anyway, for the router) instead of the K-times larger
expanded rows and expands them again for the weight gradient.

Rows past ``offsets_L[-1]`` (a bounded plan's unused tail) take part in nothing; their output rows are unwritten
(fused and grouped) or zero (loop). Shapes: N rows, D model dim, F expert hidden size, W = 2F (SwiGLU: gate | up)
or F (GELU), L local experts.
"""
from __future__ import annotations

from typing import Optional

import torch

from piper_ds.ops import activation as act
from piper_ds.ops import permute
from piper_ds.ops.compiled import compiled_op
from piper_ds.ops.reference import activation_reference

__all__ = ["grouped_mlp", "fanned_grouped_mlp", "grouped_path", "dense_mlp"]


class _GroupedLinear(torch.autograd.Function):
    """h = x_ND @ w[l] for the rows of expert l (``torch._grouped_mm``), its backward as two grouped GEMMs.

    x_ND is the input itself (``pos_RK`` None) or, with a fan index, expand_rows(x_RD, pos_RK, num_rows) (row r of
    x_RD copied to rows pos[r, k]; ``row_op`` is the compiled permute op). With a fan index the node keeps x_RD and
    the index for backward, not the K-times larger expanded rows: backward expands them again for the weight
    gradient and frees them before the input gradient is allocated. x_RD is usually kept anyway (the router's
    backward needs the layer input), so the expanded rows cost memory only inside this node."""

    @staticmethod
    def forward(ctx, x, w_LDW, offsets_L, pos_RK=None, num_rows=0, row_op=None):
        x_ND = x if pos_RK is None else row_op.expand_rows(x, pos_RK, num_rows)
        ctx.save_for_backward(x, w_LDW, offsets_L, pos_RK)
        ctx.num_rows, ctx.row_op = num_rows, row_op
        return torch._grouped_mm(x_ND, w_LDW, offs=offsets_L)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h_NW):
        x, w_LDW, offsets, pos_RK = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_h_NW = grad_h_NW.contiguous()
        grad_x = grad_w = None
        if need_w:
            x_ND = x if pos_RK is None else ctx.row_op.expand_rows(x, pos_RK, ctx.num_rows)
            grad_w = torch._grouped_mm(x_ND.mT, grad_h_NW, offs=offsets)
            del x_ND  # with a fan index, its memory serves the input gradient next
        if need_x:
            grad_x = torch._grouped_mm(grad_h_NW, w_LDW.mT, offs=offsets)
            if pos_RK is not None:
                grad_x = ctx.row_op.reduce_rows(grad_x, pos_RK, None)
        return grad_x, grad_w, None, None, None, None


class _FusedActivationDown(torch.autograd.Function):
    """y = act(h) @ w_down with the fused activation: grouped (``offsets_L`` given: w_down [L, F, D], rows of expert
    l by ``torch._grouped_mm``) or dense (``offsets_L`` None: w_down [D, F], ``nn.Linear``'s layout). Saves h only
    and recomputes the activation in backward.

    The up projection is a node of its own (:class:`_GroupedLinear`, or ``F.linear`` for the dense MLP) rather than
    part of this function: autograd then frees h, the activation and the output gradient when this backward
    returns, before the up projection's backward allocates the largest weight gradient, so the layer's peak
    memory holds x, grad_h and grad_x alone beside the weights' gradients."""

    @staticmethod
    def forward(ctx, h_NW, w_down, offsets_L, activation, backend):
        a_NF = act.activation_forward(h_NW, activation, backend)
        ctx.save_for_backward(h_NW, w_down, offsets_L)
        ctx.activation, ctx.backend = activation, backend
        if offsets_L is None:
            return torch.mm(a_NF, w_down.t())
        return torch._grouped_mm(a_NF, w_down, offs=offsets_L)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_ND):
        h_NW, w_down, offsets = ctx.saved_tensors
        need_h, need_down = ctx.needs_input_grad[:2]
        grad_y_ND = grad_y_ND.contiguous()
        grouped = offsets is not None
        grad_a = torch._grouped_mm(grad_y_ND, w_down.mT, offs=offsets) if grouped else torch.mm(grad_y_ND, w_down)
        grad_h, a_NF = act.activation_backward(grad_a, h_NW, ctx.activation, recompute=need_down,
                                               backend=ctx.backend)
        del grad_a
        grad_down = None
        if need_down:
            grad_down = torch._grouped_mm(a_NF.mT, grad_y_ND, offs=offsets) if grouped else torch.mm(grad_y_ND.t(),
                                                                                                      a_NF)
        return grad_h if need_h else None, grad_down, None, None, None


def dense_mlp(x: torch.Tensor, w_up_WD: torch.Tensor, w_down_DF: torch.Tensor, activation: str = "swiglu",
              backend: str = "auto") -> torch.Tensor:
    """A dense MLP, y = act(x @ w_up.T) @ w_down.T, in ``nn.Linear``'s weight layout: [..., D] -> [..., D].

    w_up_WD [W, D] (SwiGLU: W = 2F, gate rows first, then up rows; GELU: W = F), w_down_DF [D, F]; both in x's
    dtype. With the compiled activation op (``backend``) and x in bf16/fp16/fp32 it runs two GEMMs and the fused
    activation forward, and saves only x and h = x @ w_up.T for backward (the activation is recomputed there);
    otherwise (``backend="reference"``, no op, or no rows) PyTorch's autograd over ``silu(gate) * up`` (or
    ``gelu(h)``) in x's dtype, as a plain PyTorch FFN computes it.
    Differentiable in x and both weights.
    """
    if activation not in act.ACTIVATIONS:
        raise ValueError(f"activation must be one of {act.ACTIVATIONS}, got {activation!r}")
    W, D = w_up_WD.shape
    F = W // 2 if activation == "swiglu" else W
    if (activation == "swiglu" and W % 2) or tuple(w_down_DF.shape) != (D, F) or x.shape[-1] != D:
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, w_up {tuple(w_up_WD.shape)}, w_down "
                         f"{tuple(w_down_DF.shape)} ({activation}: w_up [{'2F' if activation == 'swiglu' else 'F'}"
                         ", D], w_down [D, F])")
    if w_up_WD.dtype != x.dtype or w_down_DF.dtype != x.dtype:
        raise TypeError(f"x, w_up and w_down must share a dtype, got {x.dtype}, {w_up_WD.dtype}, {w_down_DF.dtype}")
    x_ND = x.reshape(-1, D)
    if x_ND.shape[0] > 0 and act.compiled_available(x.device, backend):
        h_NW = torch.nn.functional.linear(x_ND, w_up_WD)
        return _FusedActivationDown.apply(h_NW, w_down_DF, None, activation, backend).view(*x.shape[:-1], D)
    h = torch.nn.functional.linear(x, w_up_WD)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up
    else:
        a = torch.nn.functional.gelu(h)
    return torch.nn.functional.linear(a, w_down_DF)


def _check_mlp(x: torch.Tensor, w_up_LDW: torch.Tensor, w_down_LFD: torch.Tensor, counts_L: torch.Tensor,
               activation: str) -> None:
    if activation not in act.ACTIVATIONS:
        raise ValueError(f"activation must be one of {act.ACTIVATIONS}, got {activation!r}")
    L, D, W = w_up_LDW.shape
    F = W // 2 if activation == "swiglu" else W
    if tuple(w_down_LFD.shape) != (L, F, D) or x.dim() != 2 or x.shape[1] != D:
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, w_up {tuple(w_up_LDW.shape)}, w_down "
                         f"{tuple(w_down_LFD.shape)} ({activation}: w_up [L, D, {'2F' if F != W else 'F'}], "
                         "w_down [L, F, D])")
    if tuple(counts_L.shape) != (L,):
        raise ValueError(f"counts_L must have shape ({L},), got {tuple(counts_L.shape)}")


def fanned_grouped_mlp(x_RD: torch.Tensor, pos_RK: torch.Tensor, num_rows: int, w_up_LDW: torch.Tensor,
                       w_down_LFD: torch.Tensor, counts_L: torch.Tensor, offsets_L: Optional[torch.Tensor] = None,
                       activation: str = "swiglu", backend: str = "auto") -> torch.Tensor:
    """:func:`grouped_mlp` of the rows ``expand_rows(x_RD, pos_RK, num_rows)`` (:mod:`piper_ds.ops.permute`: row
    r of x_RD copied to rows pos[r, k], the rows grouped by local expert): [num_rows, D].

    The same values and gradients as expanding first; on the fused path the expanded [num_rows, D] rows are not
    kept for backward (they are expanded again there), which lowers the layer's activation memory by that much
    and its peak by about as much.
    """
    permute.check_fan(x_RD, pos_RK, num_rows)  # before the path is chosen: a malformed input fails the same on all
    _check_mlp(x_RD, w_up_LDW, w_down_LFD, counts_L, activation)
    path = grouped_path(x_RD, w_up_LDW, w_down_LFD, backend) if num_rows > 0 else "loop"
    row_op = compiled_op("permute", x_RD.device, backend) if path == "fused" else None
    if row_op is None or w_up_LDW.dtype != x_RD.dtype or w_down_LFD.dtype != x_RD.dtype:
        return grouped_mlp(permute.expand_rows(x_RD, pos_RK, num_rows, backend), w_up_LDW, w_down_LFD, counts_L,
                           offsets_L, activation, backend)
    offsets = offsets_L if offsets_L is not None else torch.cumsum(counts_L, 0, dtype=torch.int32)
    h_NW = _GroupedLinear.apply(x_RD, w_up_LDW, offsets, pos_RK, num_rows, row_op)
    return _FusedActivationDown.apply(h_NW, w_down_LFD, offsets, activation, backend)


def grouped_path(x_ND: torch.Tensor, w_up_LDW: torch.Tensor, w_down_LFD: torch.Tensor, backend: str) -> str:
    """'fused', 'grouped' or 'loop': the path :func:`grouped_mlp` takes for these tensors and backend."""
    aligned = all(n % 8 == 0 for n in (w_up_LDW.shape[1], w_up_LDW.shape[2], w_down_LFD.shape[1]))
    if not (x_ND.is_cuda and x_ND.dtype == torch.bfloat16 and aligned and x_ND.shape[0] > 0):
        return "loop"
    if backend == "reference" or not act.compiled_available(x_ND.device, backend):
        return "grouped"
    return "fused"


def _loop_mlp(x_ND, w_up, w_down, counts_L, activation):
    counts = counts_L.tolist()
    rows_in = x_ND[:sum(counts)]  # a bounded plan's tail rows may hold anything, NaN included: never read
    outs = [activation_reference(rows @ w_u, activation) @ w_d
            for rows, w_u, w_d, n in zip(torch.split(rows_in, counts), w_up.unbind(0), w_down.unbind(0), counts)
            if n > 0]
    # the anchor keeps x and every weight on the graph: each rank's gradient hooks fire, also with no rows
    anchor = 0 * (w_up.sum() + w_down.sum() + rows_in.sum())
    tail = x_ND.new_zeros(x_ND.shape[0] - sum(counts), w_down.shape[-1])
    return torch.cat(outs + [tail]) + anchor if outs else tail + anchor


def grouped_mlp(x_ND: torch.Tensor, w_up_LDW: torch.Tensor, w_down_LFD: torch.Tensor, counts_L: torch.Tensor,
                offsets_L: Optional[torch.Tensor] = None, activation: str = "swiglu",
                backend: str = "auto") -> torch.Tensor:
    """Rows of x grouped by local expert (``counts_L`` rows each, in order) through their expert's MLP: [N, D].

    x_ND [N, D]; w_up_LDW [L, D, W] (SwiGLU: gate in [..., :F], up in [..., F:]); w_down_LFD [L, F, D];
    counts_L int64 [L]; offsets_L int32 [L] = cumsum(counts_L) (built from the counts when not given).
    Differentiable in x and both weights; output in x's dtype (weights of another dtype are cast).
    """
    _check_mlp(x_ND, w_up_LDW, w_down_LFD, counts_L, activation)
    w_up = w_up_LDW if w_up_LDW.dtype == x_ND.dtype else w_up_LDW.to(x_ND.dtype)
    w_down = w_down_LFD if w_down_LFD.dtype == x_ND.dtype else w_down_LFD.to(x_ND.dtype)
    path = grouped_path(x_ND, w_up, w_down, backend)
    if path == "loop":
        return _loop_mlp(x_ND, w_up, w_down, counts_L, activation)
    offsets = offsets_L if offsets_L is not None else torch.cumsum(counts_L, 0, dtype=torch.int32)
    if path == "fused":
        h_NW = _GroupedLinear.apply(x_ND, w_up, offsets)
        return _FusedActivationDown.apply(h_NW, w_down, offsets, activation, backend)
    h = activation_reference(torch._grouped_mm(x_ND, w_up, offs=offsets), activation)
    return torch._grouped_mm(h, w_down, offs=offsets)
