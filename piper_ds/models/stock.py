"""The same MoE sub-layer built on stock ``deepspeed.moe.layer.MoE``, for side-by-side benchmarks.

Stock DeepSpeed-MoE: top-k softmax gate, capacity ``capacity_factor * T * k / E`` per expert (1.25 here),
tokens over capacity dropped, dense capacity-padded dispatch through einsum. Each expert is the same bias-free
SwiGLU/GELU :class:`FeedForward` PiperMoE uses, and shared experts are one dense FFN beside it, so parameter
counts match the PiperMoE model exactly.
"""
from __future__ import annotations

from typing import Tuple

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from piper_ds.moe import FeedForward, MoEConfig
from piper_ds.system.specs import ModelSpec


class StockMoEFFN(nn.Module):
    """FFN sub-layer ``forward(x [B,S,D]) -> (y [B,S,D], l_aux fp32 scalar)`` on stock DeepSpeed MoE.

    ``l_aux`` is stock's load-balancing loss times ``moe_config.aux_loss_coef``. The attribute holding the MoE
    is ``moe`` and the shared FFN ``shared_mlp`` (no "expert" in either name: DeepSpeed's MoE checkpointing
    treats every key containing "expert" under an MoE module as an expert weight).
    """

    def __init__(self, spec: ModelSpec, moe_config: MoEConfig, ep_size: int, capacity_factor: float = 1.25):
        super().__init__()
        # the plain PyTorch FFN, as stock DeepSpeed-MoE users write it
        expert = FeedForward(spec.d_model, spec.d_ffn_expert, spec.activation, kernels="reference")
        self.moe = MoE(spec.d_model, expert, num_experts=spec.num_experts, ep_size=ep_size, k=spec.top_k,
                       capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor, drop_tokens=True)
        # Stock MoE deep-copies one expert per local slot (identical weights); give each its own draw.
        with torch.no_grad():
            for m in self.moe.deepspeed_moe.experts.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.02)
        self.aux_loss_coef = moe_config.aux_loss_coef
        self.shared_mlp = FeedForward(spec.d_model, spec.n_shared_experts * spec.d_ffn_expert, spec.activation,
                                      kernels="reference") if spec.n_shared_experts else None

    def forward(self, x_BSD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y, l_aux, _ = self.moe(x_BSD)
        if self.shared_mlp is not None:
            y = y + self.shared_mlp(x_BSD)
        return y, self.aux_loss_coef * l_aux.float()
