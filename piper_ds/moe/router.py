"""Top-k router: scores, group-limited selection, aux and z losses, aux-loss-free selection bias."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from piper_ds.moe.config import MoEConfig
from piper_ds.ops import reference


class RouterOutput(NamedTuple):
    """The routing of T tokens: topk_idx_TK int64 [T, K] (-1 = dropped), topk_weights_TK fp32 [T, K],
    tokens_per_expert_E int64 [E] (assignments asked for, before dropping), and what the losses need: scores_TE
    fp32 [T, E] and the router's logits_TE fp32 [T, E]."""

    topk_idx_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor


def split_bf16x3(t: torch.Tensor) -> torch.Tensor:
    """fp32 t [..., C] as three bf16 parts side by side, [..., 3, C], whose fp32 sum is t: each part is the bf16
    rounding of what the parts before it leave, and three 8-bit significands cover fp32's 24 (exact for every
    normal fp32 value; only values below about 1e-36 lose low bits). A product of two bf16 numbers is exact in
    fp32, so a bf16 GEMM with fp32 accumulation over the parts computes the fp32 GEMM of t up to summation order,
    at tensor-core speed and without an fp32 copy of the other operand."""
    parts = torch.empty(*t.shape[:-1], 3, t.shape[-1], dtype=torch.bfloat16, device=t.device)
    parts[..., 0, :].copy_(t)
    rest = torch.sub(t, parts[..., 0, :])  # in fp32 (type promotion), exact: the rounding error of part 0
    parts[..., 1, :].copy_(rest)
    torch.sub(rest, parts[..., 1, :], out=parts[..., 2, :])
    return parts


class _RouterLogits(torch.autograd.Function):
    """fp32 logits of bf16 x and router weight from one GEMM with fp32 output (no fp32 copy of x kept for
    backward); gradients as ``linear(x.float(), w.float())`` gives them (fp32 products and sums), computed by bf16
    tensor-core GEMMs over the fp32 logits gradient split in three bf16 parts (:func:`split_bf16x3`): no fp32
    copy of x is made.

    Both gradient GEMMs write fp32 and are rounded once afterwards. A GEMM with bf16 output may reduce in bf16
    under torch's default ``allow_bf16_reduced_precision_reduction``; measured on an H100, that put the input
    gradient of a 7-expert router (K = 21) 600-1000x outside fp32's error bound, which undoes the split."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        return torch.mm(x_TD, w_ED.t(), out_dtype=torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        (T, E), D = grad_TE.shape, x_TD.shape[1]
        parts_T3E = split_bf16x3(grad_TE).view(T, 3 * E)  # grad_TE is fp32: the logits are
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # sum over the 3E parts in fp32, rounded to bf16 once
            grad_x = torch.mm(parts_T3E, w_ED.repeat(3, 1), out_dtype=torch.float32).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(parts_T3E.t(), x_TD, out_dtype=torch.float32).view(3, E, D).sum(0).to(w_ED.dtype)
        return grad_x, grad_w


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """Router logits [T, E] in fp32 whatever the model dtype (bf16 products are exact in fp32, so one GEMM with
    fp32 output equals the fp32 GEMM of the upcast operands up to summation order)."""
    if x_TD.is_cuda and x_TD.dtype == torch.bfloat16 and weight_ED.dtype == x_TD.dtype:
        return _RouterLogits.apply(x_TD, weight_ED)
    return nn.functional.linear(x_TD.float(), weight_ED.float())


class TopKGateFP32(nn.Module):
    """Router of one MoE layer. Math is fp32 whatever the model dtype.

    Named like DeepSpeed's gate (``gate.wg.weight``) so DeepSpeed's MoE checkpoint code keeps it in the
    dense (non-expert) state. ``selection_bias`` is the aux-loss-free balancing bias; it is a buffer, the same
    on every rank, changed only by :meth:`update_selection_bias` (or loaded with the weights: a fixed bias used
    with ``use_selection_bias``).
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
        """Routes x_TD [T, D]. The losses are a separate call (:meth:`losses`) so that a layer can launch its
        experts first: the loss kernels are tiny, and launched before the experts they would only delay them."""
        cfg = self.config
        logits = router_logits(x_TD, self.wg.weight)
        use_bias = cfg.bias_update_rate > 0 or cfg.use_selection_bias
        # positional: the fused kernel and the reference share this argument order (the kernel scores groups
        # 'top2_sum' only; the layer gives it no other)
        args = (logits, cfg.top_k, cfg.score_func, self.selection_bias if use_bias else None, cfg.n_groups,
                cfg.topk_groups, cfg.normalize_weights, cfg.routed_scaling_factor)
        gate = self.gating_fn(*args) if self.gating_fn is not None else \
            reference.gating_reference(*args, group_score=cfg.group_score)
        if cfg.bias_update_rate > 0 and self.training:
            self.pending_load += gate.tokens_per_expert_E.float()
        return RouterOutput(gate.topk_idx_TK, gate.topk_weights_TK, gate.tokens_per_expert_E, gate.scores_TE,
                            logits)

    def losses(self, route: RouterOutput) -> Tuple[torch.Tensor, torch.Tensor]:
        """(aux loss, z loss) of a routing, fp32 scalars already multiplied by their coefficients; each is a zero
        still attached to the router's graph when its coefficient is 0 or the router is in eval mode."""
        cfg = self.config
        want_aux = cfg.aux_loss_coef > 0 and self.training
        want_z = cfg.z_loss_coef > 0 and self.training
        zero = route.logits_TE.sum() * 0.0 if not (want_aux and want_z) else None
        aux = self._aux_loss(route, cfg.aux_loss_coef) if want_aux else zero
        z = cfg.z_loss_coef * reference.z_loss_reference(route.logits_TE) if want_z else zero
        return aux, z

    def _aux_loss(self, route: RouterOutput, coef: float) -> torch.Tensor:
        """``coef`` times the load-balancing loss (``aux_loss_reference``); 'switch' from the router's own counts
        (a dot product of the summed scores and the counts, the coefficient folded into one scale: four launches
        instead of the reference's nine)."""
        T, K = route.topk_idx_TK.shape
        if self.config.aux_loss_type != "switch" or T == 0:
            return coef * reference.aux_loss_reference(route.scores_TE, route.topk_idx_TK, self.config.aux_loss_type)
        summed_scores = route.scores_TE.float().sum(dim=0)
        return torch.dot(summed_scores, route.tokens_per_expert_E.to(summed_scores.dtype)) * (
            coef * self.num_experts / (T * T * K))

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
