"""Rotary position embedding in one pass each way (the attention's q and k): the compiled op ``piper_rope`` when
built, :func:`piper_ds.ops.reference.rope_reference` otherwise.

The output keeps x's memory layout, so the usual transposed view of a [B, S, H, Dh] projection goes in and comes
out without a copy; the gradient keeps the incoming gradient's layout (the attention's backward returns it in its
input's, i.e. x's, layout). Backward is the same op rotating back (the rotation is
orthogonal): nothing is saved but the angle tables.
"""
from __future__ import annotations

import torch

from piper_ds.ops.compiled import compiled_op
from piper_ds.ops.reference import rope_reference

__all__ = ["rotary"]


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, op):
        ctx.save_for_backward(cos, sin)
        ctx.op = op
        return op.rope(x, cos, sin, False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        return ctx.op.rope(grad_out, cos, sin, True), None, None, None


def rotary(x_BHSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x rotated by its positions' angles: x1 * cos - x2 * sin | x2 * cos + x1 * sin over the halves of Dh.

    x_BHSD [B, H, S, Dh] (any strides); cos_SH, sin_SH fp32 [S_max >= S, Dh/2], the angles of positions
    0 .. S_max - 1. Output in x's dtype and memory layout; differentiable in x (math in fp32, fp64 for fp64).
    """
    if not isinstance(x_BHSD, torch.Tensor) or not x_BHSD.is_floating_point() or x_BHSD.dim() != 4:
        raise TypeError(f"x_BHSD must be a 4-D floating torch.Tensor, got "
                        f"{getattr(x_BHSD, 'dtype', type(x_BHSD).__name__)} {tuple(getattr(x_BHSD, 'shape', ()))}")
    B, H, S, Dh = x_BHSD.shape
    if Dh % 2:
        raise ValueError(f"the rotary embedding needs an even head_dim, got x of shape {tuple(x_BHSD.shape)}")
    for name, t in (("cos_SH", cos_SH), ("sin_SH", sin_SH)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != Dh // 2 or t.shape[0] < S:
            raise ValueError(f"{name} must be float32 [S_max >= {S}, {Dh // 2}], got {t.dtype} {tuple(t.shape)}")
    op = compiled_op("rope", x_BHSD.device, backend)
    if op is None:
        return rope_reference(x_BHSD, cos_SH, sin_SH)
    if x_BHSD.stride(-1) != 1:
        x_BHSD = x_BHSD.contiguous()
    cos_SH, sin_SH = cos_SH.contiguous(), sin_SH.contiguous()
    if not (torch.is_grad_enabled() and x_BHSD.requires_grad):
        return op.rope(x_BHSD, cos_SH, sin_SH, False)
    return _Rotary.apply(x_BHSD, cos_SH, sin_SH, op)
