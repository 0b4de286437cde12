"""Top-k router: scores, group-limited selection, aux and z losses, aux-loss-free selection bias."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from piper_ds.moe.config import MoEConfig
from piper_ds.ops import reference


class RouterOutput(NamedTuple):
    """topk_idx_TK int64 (-1 = dropped), topk_weights_TK fp32, aux_loss and z_loss fp32 scalars (already
    multiplied by their coefficients), tokens_per_expert_E int64 (assignments asked for, before dropping)."""

    topk_idx_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor


class TopKGateFP32(nn.Module):
    """Router of one MoE layer. Math is fp32 whatever the model dtype.

    Named like DeepSpeed's gate (``gate.wg.weight``) so DeepSpeed's MoE checkpoint code keeps it in the
    dense (non-expert) state. ``selection_bias`` is the aux-loss-free balancing bias; it is a buffer, the same
    on every rank, changed only by :meth:`update_selection_bias`.
    """

    def __init__(self, hidden_size: int, num_experts: int, config: MoEConfig):
        super().__init__()
        self.num_experts, self.config = num_experts, config
        self.wg = nn.Linear(hidden_size, num_experts, bias=False).float()
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32))
        # loads seen since the last bias update; not part of the checkpoint
        self.register_buffer("pending_load", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.gating_fn = None  # set by the layer to a fused kernel wrapper when one is used

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.config
        logits = nn.functional.linear(x_TD.float(), self.wg.weight.float())
        use_bias = cfg.bias_update_rate > 0
        # positional: the fused kernel and the reference share this argument order
        gate = (self.gating_fn or reference.gating_reference)(
            logits, cfg.top_k, cfg.score_func, self.selection_bias if use_bias else None, cfg.n_groups,
            cfg.topk_groups, cfg.normalize_weights, cfg.routed_scaling_factor)
        zero = logits.sum() * 0.0
        aux = cfg.aux_loss_coef * reference.aux_loss_reference(gate.scores_TE, gate.topk_idx_TK, cfg.aux_loss_type) \
            if cfg.aux_loss_coef > 0 and self.training else zero
        z = cfg.z_loss_coef * reference.z_loss_reference(logits) if cfg.z_loss_coef > 0 and self.training else zero
        if use_bias and self.training:
            self.pending_load += gate.tokens_per_expert_E.float()
        return RouterOutput(gate.topk_idx_TK, gate.topk_weights_TK, aux, z, gate.tokens_per_expert_E)

    @torch.no_grad()
    def update_selection_bias(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Moves the selection bias by ``bias_update_rate`` towards equal load, from the load seen since the
        last call summed over ``group`` (the data-parallel group: every replica must keep the same bias)."""
        rate = self.config.bias_update_rate
        if rate == 0:
            return
        load = self.pending_load.clone()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(load, group=group)
        self.selection_bias.copy_(reference.bias_update_reference(self.selection_bias, load, rate))
        self.pending_load.zero_()
