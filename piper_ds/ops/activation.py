"""The experts' activation, fused: SwiGLU of a gate | up row or exact GELU, forward and backward in one pass each.

``activation_forward(h, activation)`` and ``activation_backward(grad_a, h, activation, recompute)`` compute
exactly :func:`piper_ds.ops.reference.activation_reference` and its gradient (fp32 math, one rounding per
output). The backward can return the activation again (``recompute``): the grouped MLP then keeps only h for
backward, not the activation. Backend by ``backend`` ("auto" | "cuda" | "cpu" | "reference", see
``op_builder/loader.py``); the reference backend is PyTorch's own autograd over the reference.

Shapes: N rows, F expert hidden size, W = 2F (SwiGLU: gate | up) or F (GELU).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from piper_ds.ops.compiled import compiled_op
from piper_ds.ops.reference import activation_reference

__all__ = ["activation_forward", "activation_backward", "compiled_available", "ACTIVATIONS"]

ACTIVATIONS = ("swiglu", "gelu")


def compiled_available(device: torch.device, backend: str = "auto") -> bool:
    """Whether ``backend`` runs the compiled op (not the reference) for tensors on ``device``."""
    return compiled_op("activation", device, backend) is not None


def _check(h_NW: torch.Tensor, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(h_NW, torch.Tensor) or not h_NW.is_floating_point() or h_NW.dim() != 2:
        raise TypeError(f"h_NW must be a 2-D floating torch.Tensor, got "
                        f"{getattr(h_NW, 'dtype', type(h_NW).__name__)} {tuple(getattr(h_NW, 'shape', ()))}")
    if activation == "swiglu" and h_NW.shape[1] % 2:
        raise ValueError(f"SwiGLU needs an even width (gate | up), got h of shape {tuple(h_NW.shape)}")


def activation_forward(h_NW: torch.Tensor, activation: str, backend: str = "auto") -> torch.Tensor:
    """a [N, F] = silu(gate) * up of h = gate | up [N, 2F] (SwiGLU), or gelu(h) of h [N, F]. Not differentiable
    itself: :class:`piper_ds.ops.experts.grouped_mlp` pairs it with :func:`activation_backward`."""
    _check(h_NW, activation)
    op = compiled_op("activation", h_NW.device, backend)
    if op is None:
        with torch.no_grad():
            return activation_reference(h_NW, activation)
    return op.act_forward(h_NW, activation == "swiglu")


def activation_backward(grad_a_NF: torch.Tensor, h_NW: torch.Tensor, activation: str, recompute: bool = False,
                        backend: str = "auto") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(grad_h [N, W], a [N, F] recomputed in the same pass, or None without ``recompute``)."""
    _check(h_NW, activation)
    F = h_NW.shape[1] // 2 if activation == "swiglu" else h_NW.shape[1]
    if tuple(grad_a_NF.shape) != (h_NW.shape[0], F):
        raise ValueError(f"grad_a_NF must have shape {(h_NW.shape[0], F)}, got {tuple(grad_a_NF.shape)}")
    op = compiled_op("activation", h_NW.device, backend)
    if op is not None:
        grad_h, a = op.act_backward(grad_a_NF, h_NW, activation == "swiglu", bool(recompute))
        return grad_h, a
    with torch.enable_grad():
        h = h_NW.detach().requires_grad_(True)
        a = activation_reference(h, activation)
        (grad_h, ) = torch.autograd.grad(a, h, grad_a_NF)
    return grad_h, a.detach() if recompute else None
