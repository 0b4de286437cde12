"""DeepSpeed AutoEP's MoE layer as a peer of the MoE layer benchmark (``--peers ...,autoep``).

DeepSpeed 0.19 ships AutoEP (``deepspeed.module_inject.auto_ep_layer.AutoEPMoELayer``): a dropless expert-parallel
layer with grouped-GEMM experts (TorchTitan-derived) that replaces the MoE blocks of HuggingFace models. It can be
driven on a plain module: the layer copies its router and its local experts out of a "source" module described by
a hand-written ``MoELayerSpec`` (softmax scores, top-k renormalised, weights applied after the experts, no shared
experts: the routing PiperMoE's defaults use). Its experts are always gated (gate, up, down), so only SwiGLU
compares like for like; 2-matrix GELU experts are refused. It needs ``deepspeed.init_distributed`` at ep > 1 (its
all-to-all goes through ``deepspeed.comm``).

``forward(x [T, d]) -> (y [T, d], None, None)``: AutoEP computes no aux loss.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


class _PlainMoE(nn.Module):
    """The source AutoEP copies from: router ``gate`` [E, d] and experts stacked as ``fused_3d`` tensors."""

    def __init__(self, d: int, f: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.Module()
        self.experts.gate_proj = nn.Parameter(torch.randn(num_experts, f, d) * d ** -0.5)  # w1 [E, f, d]
        self.experts.up_proj = nn.Parameter(torch.randn(num_experts, f, d) * d ** -0.5)  # w3 [E, f, d]
        self.experts.down_proj = nn.Parameter(torch.randn(num_experts, d, f) * f ** -0.5)  # w2 [E, d, f]


def layer_spec(d: int, f: int, num_experts: int, top_k: int):
    """The ``MoELayerSpec`` of :class:`_PlainMoE` (what AutoEP's own parser detects for it)."""
    from deepspeed.module_inject.auto_ep_config import MoELayerSpec
    return MoELayerSpec(
        moe_module_name="moe", model_family="custom", router_name="gate", experts_name="experts",
        expert_storage="fused_3d", expert_w1_name="gate_proj", expert_w2_name="down_proj", expert_w3_name="up_proj",
        num_experts=num_experts, top_k=top_k, hidden_size=d, ffn_hidden_size=f, score_func="softmax",
        score_apply="post", route_norm=True, gate_bias=False, return_router_logits=False,
        router_logits_capture_target="none", router_logits_capture_index=None,
        router_logits_capture_layer_name=None, has_shared_experts=False, shared_experts_name="",
        expert_activation="swiglu")


class AutoEPPeer(nn.Module):
    """AutoEP's layer for one benchmark shape (``d``, ``f``, ``E``, ``k``), SwiGLU experts.

    Every rank draws the same full weights from ``seed`` and keeps this rank's experts (ranks hold contiguous
    expert ranges, as PiperMoE's placement does); with ``keep_reference`` the full weights stay on the host for
    :meth:`reference`.
    """

    def __init__(self, shape: Dict[str, int], ep_size: int = 1, ep_rank: int = 0, activation: str = "swiglu",
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.bfloat16, seed: int = 1234,
                 keep_reference: bool = True):
        super().__init__()
        if activation != "swiglu":
            raise ValueError(f"AutoEP's experts are gated (gate, up, down): activation {activation!r} cannot be "
                             "compared like for like; use --activation swiglu")
        d, f, num_experts, k = shape["d"], shape["f"], shape["E"], shape["k"]
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
        from deepspeed.module_inject.auto_ep_config import AutoEPConfig
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
        torch.manual_seed(seed)
        source = _PlainMoE(d, f, num_experts).to(device=device, dtype=dtype)
        self.ep_size, self.top_k = ep_size, k
        self.full = {n: p.detach().float().cpu() for n, p in source.named_parameters()} if keep_reference else None
        self.layer = AutoEPMoELayer(layer_spec(d, f, num_experts, k), source, ep_size=ep_size, ep_rank=ep_rank,
                                    config=AutoEPConfig(enabled=True, autoep_size=ep_size, use_grouped_mm=True))

    def set_deepspeed_parallelism(self) -> None:
        """Creates (or reuses) DeepSpeed's EP groups for the layer's all-to-all (ep > 1)."""
        if self.ep_size > 1:
            self.layer.set_deepspeed_parallelism()

    def forward(self, x_TD: torch.Tensor):
        return self.layer(x_TD.unsqueeze(0)).squeeze(0), None, None

    @torch.no_grad()
    def reference(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The dense fp32 output of the same MoE (all experts) on ``x_TD`` [T, d]."""
        from piper_ds.ops import reference as R
        if self.full is None:
            raise ValueError("built with keep_reference=False: no full weights to compare against")
        w = {n: t.to(x_TD.device) for n, t in self.full.items()}
        x = x_TD.float()
        g = R.gating_reference(x @ w["gate.weight"].t(), self.top_k, "softmax")
        return R.moe_reference(x, g.topk_idx_TK, g.topk_weights_TK, w["experts.gate_proj"].transpose(1, 2),
                               w["experts.down_proj"].transpose(1, 2), w["experts.up_proj"].transpose(1, 2))
