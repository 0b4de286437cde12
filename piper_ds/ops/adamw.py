"""Adam(W) over fp32 master weights in one pass: the update of a ZeRO partition from its low-precision gradients.

``adamw_step(grads, master, exp_avg, exp_avg_sq, lowp, ...)`` updates ``master`` (and the moments) in place,
where ``grads[k]`` is the gradient of the next ``grads[k].numel()`` elements of the 1-D master (laid end to end
from element 0; elements past the last gradient are left as they are), and writes the updated weights, rounded,
into ``lowp``. The gradient is multiplied by ``grad_multiplier`` on the way in, so gradient clipping and
loss-scale division cost no pass of their own. Math: :func:`piper_ds.ops.reference.adamw_reference` (torch.optim
Adam/AdamW's update). Backend by ``backend`` ("auto" | "cuda" | "cpu" | "reference", see
``op_builder/loader.py``).

A CUDA launch per gradient tensor reads 2 + 12 bytes and writes 12 + 2 bytes per bf16 parameter; the step count
and the multiplier stay on the device.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from piper_ds.ops.compiled import compiled_op
from piper_ds.ops.reference import adamw_reference

__all__ = ["adamw_step"]


def _check(grads: Sequence[torch.Tensor], master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           lowp: Optional[torch.Tensor], step: torch.Tensor) -> list:
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous():
            raise TypeError(f"{name} must be a 1-D contiguous fp32 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.numel() != master.numel() or t.device != master.device:
            raise ValueError(f"{name} ({t.numel()} elements on {t.device}) must match master ({master.numel()} "
                             f"on {master.device})")
    if lowp is not None and (lowp.dim() != 1 or lowp.numel() != master.numel() or lowp.device != master.device
                             or not lowp.is_floating_point()):
        raise ValueError(f"lowp must be a 1-D floating tensor as long as master ({master.numel()}) on "
                         f"{master.device}, got {lowp.dtype} {tuple(lowp.shape)} on {lowp.device}")
    if not isinstance(step, torch.Tensor) or step.numel() != 1 or not step.is_floating_point():
        raise TypeError(f"step must be a one-element float tensor (the optimizer's state['step']), got {step!r}")
    offsets, at = [], 0
    for k, g in enumerate(grads):
        if not isinstance(g, torch.Tensor) or not g.is_floating_point() or g.device != master.device:
            raise TypeError(f"grads[{k}] must be a floating tensor on {master.device}, got "
                            f"{getattr(g, 'dtype', type(g).__name__)} on {getattr(g, 'device', None)}")
        offsets.append(at)
        at += g.numel()
    if at > master.numel():
        raise ValueError(f"the gradients hold {at} elements, more than master's {master.numel()}")
    return offsets


@torch.no_grad()
def adamw_step(grads: Sequence[torch.Tensor], master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               lowp: Optional[torch.Tensor], *, step: torch.Tensor, lr: float, betas: Tuple[float, float],
               eps: float, weight_decay: float, decoupled: bool = True,
               grad_multiplier: Optional[torch.Tensor] = None, backend: str = "auto") -> None:
    """One Adam(W) step of ``master`` [P] fp32 (and ``exp_avg``, ``exp_avg_sq`` [P] fp32) in place.

    Args:
        grads: gradients (bf16 / fp16 / fp32, any shapes) of consecutive ranges of master, from element 0.
        lowp: [P] weights that receive the updated master, rounded to their dtype (or None).
        step: the optimizer's step count for this update, already incremented (0-dim float tensor, on the CPU
            or on master's device; it is read there, never copied to the host by the CUDA op).
        lr, betas, eps, weight_decay: the param group's hyperparameters (Python floats).
        decoupled: AdamW's weight decay (True) or Adam's L2 term (False).
        grad_multiplier: 0-dim fp32 tensor on master's device multiplying every gradient, or None.
    """
    offsets = _check(grads, master, exp_avg, exp_avg_sq, lowp, step)
    beta1, beta2 = float(betas[0]), float(betas[1])
    if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"Adam hyperparameters out of range: lr {lr}, betas {tuple(betas)}, eps {eps}, "
                         f"weight_decay {weight_decay}")
    op = compiled_op("adamw", master.device, backend)
    if op is not None:
        op.adamw_step([g.contiguous() for g in grads], offsets, master, exp_avg, exp_avg_sq, lowp, step,
                      grad_multiplier, float(lr), beta1, beta2, float(eps), float(weight_decay), bool(decoupled))
        return
    t = float(step)
    for g, at in zip(grads, offsets):
        n = g.numel()
        adamw_reference(g, master.narrow(0, at, n), exp_avg.narrow(0, at, n), exp_avg_sq.narrow(0, at, n),
                        None if lowp is None else lowp.narrow(0, at, n), t, float(lr), beta1, beta2, float(eps),
                        float(weight_decay), decoupled, grad_multiplier)
