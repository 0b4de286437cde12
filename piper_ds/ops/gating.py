"""Fused MoE router: scores, biased group-limited top-k, normalised weights and token counts in one kernel.

``fused_gating`` computes exactly :func:`piper_ds.ops.reference.gating_reference` and picks its implementation
by ``backend`` (see ``op_builder/loader.py``): the CUDA kernel for CUDA tensors when it is built or buildable,
the C++ CPU kernel for CPU tensors when it is built, else the PyTorch reference.

The kernel returns ``scores_TE`` too (fused, fp32), so the aux loss needs no second softmax/sigmoid; gradients of
both ``topk_weights_TK`` and ``scores_TE`` flow back to the logits through the kernel's backward, one kernel,
driven by an autograd node written in C++ (the op's ``forward_autograd``): no Python runs in the backward pass,
and only the scores and the indices are saved. The bias gets no gradient (it only selects), as in the reference.
The backward is not differentiable itself (no double backward). Differences from the reference, all documented choices:

* fp64 logits are computed in fp64 (weights and scores fp64), so that ``gradcheck`` works; other dtypes in fp32;
* ties among equal selection scores go to the lower expert (group) id; NaN scores are selected last;
* the CUDA kernel handles up to 1024 experts, top_k <= 32 and n_groups <= 32 (``"auto"`` falls back to the
  reference beyond that, ``"cuda"`` raises).
"""
from __future__ import annotations

from typing import Optional

import torch

from piper_ds.ops.compiled import loader as compiled_loader
from piper_ds.ops.reference import GatingOutput, gating_reference

__all__ = ["fused_gating", "GatingOutput"]

_SCORE_FUNCS = {"softmax": 0, "sigmoid": 1}
_CUDA_MAX_EXPERTS, _CUDA_MAX_K, _CUDA_MAX_GROUPS = 1024, 32, 32


def _check_args(logits: torch.Tensor, top_k: int, score_func: str, bias: Optional[torch.Tensor], n_groups: int,
                topk_groups: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [tokens, experts], got shape {tuple(logits.shape)}")
    if score_func not in _SCORE_FUNCS:
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    E = logits.shape[1]
    if n_groups < 1 or E % n_groups:
        raise ValueError(f"num_experts ({E}) must be divisible by n_groups ({n_groups})")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(f"topk_groups ({topk_groups}) must be in [1, n_groups ({n_groups})]")
    reachable = topk_groups * (E // n_groups) if n_groups > 1 else E
    if not 1 <= top_k <= reachable:
        raise ValueError(f"top_k ({top_k}) must be in [1, {reachable}]: the experts reachable in topk_groups "
                         f"({topk_groups}) of n_groups ({n_groups}) groups of {E} experts")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating torch.Tensor, got {type(bias).__name__}")
        if tuple(bias.shape) != (E,):
            raise ValueError(f"bias must have shape ({E},), got {tuple(bias.shape)}")
        if bias.device != logits.device:
            raise ValueError(f"bias ({bias.device}) and logits ({logits.device}) must be on the same device")


_OPS = {}  # (device type, backend) -> loaded op: the per-call lookup is one dict access


def _select_op(logits: torch.Tensor, top_k: int, n_groups: int, backend: str):
    if backend == "auto" and logits.is_cuda and (logits.shape[1] > _CUDA_MAX_EXPERTS or top_k > _CUDA_MAX_K
                                                 or n_groups > _CUDA_MAX_GROUPS):
        return None  # beyond the CUDA kernel's limits: the reference
    key = (logits.device.type, backend)
    op = _OPS.get(key)
    if op is None:
        loader = compiled_loader()
        loader.check_backend(backend)
        op = loader.get_op("gating", key[0], backend)
        if op is not None:  # None is not kept: a later build may make the op available
            _OPS[key] = op
    return op


def fused_gating(logits: torch.Tensor,
                 top_k: int,
                 score_func: str = "softmax",
                 bias: Optional[torch.Tensor] = None,
                 n_groups: int = 1,
                 topk_groups: int = 1,
                 normalize: bool = True,
                 scaling: float = 1.0,
                 backend: str = "auto") -> GatingOutput:
    """Routes T tokens over E experts; same semantics as ``gating_reference``.

    Args:
        logits: [T, E] router logits, bf16/fp16/fp32/fp64.
        top_k: experts per token (K).
        score_func: "softmax" (over experts) or "sigmoid" (per expert).
        bias: optional [E] selection bias (aux-loss-free balancing): changes which experts win, not the weights.
        n_groups, topk_groups: group-limited routing; a group scores the sum of its two best biased scores and
            only the experts of the ``topk_groups`` best groups can be selected.
        normalize: renormalise the K weights of a token to sum to 1 (before ``scaling``).
        scaling: multiplies the weights (DeepSeek-V3's routed_scaling_factor).
        backend: "auto" | "cuda" | "cpu" | "reference".

    Returns:
        GatingOutput(topk_idx_TK int64 [T, K] (descending selection score), topk_weights_TK [T, K],
        scores_TE [T, E], tokens_per_expert_E int64 [E]); weights and scores fp32 (fp64 for fp64 logits).
    """
    _check_args(logits, top_k, score_func, bias, n_groups, topk_groups)
    op = _select_op(logits, top_k, n_groups, backend)
    if op is None:
        return gating_reference(logits, top_k, score_func, bias, n_groups, topk_groups, normalize, scaling)
    bias_arg = None if bias is None else bias.detach()
    # with a graph to record, the op's C++ autograd node (no Python ctx, no Python in the backward pass)
    fn = op.forward_autograd if logits.requires_grad and torch.is_grad_enabled() else op.forward
    return GatingOutput(*fn(logits, int(top_k), _SCORE_FUNCS[score_func], bias_arg, int(n_groups), int(topk_groups),
                            bool(normalize), float(scaling)))
