"""PiperMoE: a dropless, padding-free expert-parallel MoE layer inside DeepSpeed's MoE contract."""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from piper_ds.comm.alltoall import FlatAllToAll, make_transport
from piper_ds.moe import dispatch, overlapped
from piper_ds.moe.config import MoEConfig
from piper_ds.moe.experts import GroupedExperts
from piper_ds.moe.placement import ExpertPlacement
from piper_ds.moe.router import TopKGateFP32
from piper_ds.ops import reference


class FeedForward(nn.Module):
    """Dense SwiGLU/GELU FFN without biases (shared experts, dense layers)."""

    def __init__(self, hidden_size: int, d_ffn: int, activation: str = "swiglu"):
        super().__init__()
        self.swiglu = activation == "swiglu"
        self.w1 = nn.Linear(hidden_size, d_ffn, bias=False)
        self.w3 = nn.Linear(hidden_size, d_ffn, bias=False) if self.swiglu else None
        self.w2 = nn.Linear(d_ffn, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        h = nn.functional.silu(h) * self.w3(x) if self.swiglu else nn.functional.gelu(h)
        return self.w2(h)


class _MoECore(nn.Module):
    """Router + local experts + the EP transport; lives at ``<layer>.deepspeed_moe`` like DeepSpeed's MOELayer."""

    def __init__(self, gate: TopKGateFP32, experts: GroupedExperts):
        super().__init__()
        self.gate, self.experts = gate, experts
        self.ep_group = None
        self.transport = FlatAllToAll(None)

    def _set_ep_group(self, ep_group) -> None:  # DeepSpeed's MOELayer hook, called by set_deepspeed_parallelism
        self.ep_group = ep_group


def _select_ops(kind: str) -> Tuple[dispatch.Ops, Any]:
    """The planning ops and gating function for ``kernels`` = 'auto' | 'cuda' | 'reference'."""
    if kind == "reference":
        return dispatch.Ops(), None
    try:
        from piper_ds.ops import gating, permute
    except ImportError:
        if kind == "cuda":
            raise ValueError("kernels='cuda' but piper_ds.ops kernels are not available in this installation")
        return dispatch.Ops(), None
    backend = "cuda" if kind == "cuda" else "auto"
    ops = dispatch.Ops(send_plan=functools.partial(permute.send_plan, backend=backend),
                       expand_plan=functools.partial(permute.expand_plan, backend=backend), rows_backend=backend)
    return ops, functools.partial(gating.fused_gating, backend=backend)


class PiperMoE(MoE):
    """Mixture-of-Experts layer: top-k router, dropless dispatch sending each token once per EP rank, grouped
    SwiGLU/GELU experts, optional shared experts.

    A subclass of ``deepspeed.moe.layer.MoE`` so that DeepSpeed treats it as MoE: expert parameters are tagged
    for the expert-data-parallel group ``ep_size_<N>``, checkpoints are written one file per expert, and
    ``set_deepspeed_parallelism`` (called by the engine) creates the EP groups.

    Args:
        hidden_size: model dim D.
        num_experts: routed experts E (global).
        d_ffn: hidden size F of one expert.
        ep_size: ranks sharing the experts (E % ep_size == 0; world size % ep_size == 0 at engine init).
        config: :class:`MoEConfig`, a dict of its fields, or None for defaults; ``overrides`` update it.

    ``forward(x [..., D]) -> (y [..., D], l_aux fp32 scalar, tokens_per_expert [E] int64)``, like DeepSpeed's
    MoE; ``l_aux`` already carries the coefficients (aux + z loss): add it to the training loss.
    """

    def __init__(self, hidden_size: int, num_experts: int, d_ffn: int, ep_size: int = 1,
                 config: Union[MoEConfig, Dict[str, Any], None] = None, **overrides: Any):
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ would build its own gate and deep-copied experts
        base = config.model_dump() if isinstance(config, MoEConfig) else dict(config or {})
        cfg = MoEConfig(**{**base, **overrides})  # validated here, unknown keys included
        for name, value in (("hidden_size", hidden_size), ("num_experts", num_experts), ("d_ffn", d_ffn),
                            ("ep_size", ep_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
        cfg.validate_for(num_experts)
        self.config, self.hidden_size, self.d_ffn = cfg, hidden_size, d_ffn
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism, self.use_residual = False, False
        self.placement = ExpertPlacement(num_experts, ep_size)
        # DeepSpeed's EP groups are runs of consecutive ranks, so this is the EP rank the engine will bind;
        # drawing this rank's experts now avoids a second initialisation (bind_ep_group checks it).
        self.ep_rank = dist.get_rank() % ep_size if dist.is_initialized() else 0
        init_seed = int(torch.randint(0, 2**31 - 1, ()).item())  # one draw, whatever ep_size is
        gate = TopKGateFP32(hidden_size, num_experts, cfg)
        experts = GroupedExperts(hidden_size, d_ffn, self.num_local_experts, cfg, self.expert_group_name,
                                 self.placement.local_experts(self.ep_rank), init_seed)
        self.deepspeed_moe = _MoECore(gate, experts)
        self._init_seed = init_seed
        self.shared_mlp = FeedForward(hidden_size, cfg.n_shared_experts * d_ffn, cfg.activation) \
            if cfg.n_shared_experts else None
        self.ops, gating_fn = _select_ops(cfg.kernels)
        gate.gating_fn = gating_fn
        self.last_stats: Dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------- parallelism
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Creates (or reuses) DeepSpeed's EP/expert-DP groups, then binds this rank's experts and transport."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world % self.ep_size:
            raise ValueError(f"ep_size ({self.ep_size}) must divide the world size ({world})")
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        from deepspeed.utils import groups
        self.bind_ep_group(self.deepspeed_moe.ep_group, groups._get_data_parallel_group())

    def bind_ep_group(self, ep_group, dp_group=None, topology=None) -> None:
        """Uses ``ep_group`` for the all-to-all and ``dp_group`` for bias updates; re-draws this rank's experts
        if the layer was built for another EP rank, so each rank holds the experts the placement gives it."""
        self.deepspeed_moe.ep_group, self.dp_group = ep_group, dp_group
        size = dist.get_world_size(ep_group) if ep_group is not None and dist.is_initialized() else 1
        if size != self.ep_size:
            raise ValueError(f"EP group has {size} ranks but the layer was built with ep_size={self.ep_size}")
        ep_rank = dist.get_rank(ep_group) if size > 1 else 0
        self.deepspeed_moe.transport = make_transport(self.config.transport, ep_group, topology,
                                                      node_dedup=self.config.node_dedup)
        if self.config.overlap_chunks > 1 and not hasattr(self.deepspeed_moe.transport, "start"):
            warnings.warn(f"PiperMoE: overlap_chunks={self.config.overlap_chunks} is not used: transport 'auto' "
                          "chose the hierarchical all-to-all (the EP group spans nodes), which runs unchunked")
        if ep_rank != self.ep_rank:  # built for another EP rank: hold the experts the placement gives this one
            self.ep_rank = ep_rank
            self._reinit_local_experts()

    @torch.no_grad()
    def _reinit_local_experts(self) -> None:
        experts = self.deepspeed_moe.experts
        ids = self.placement.local_experts(self.ep_rank)
        for name, param in experts.named_parameters():
            fresh = torch.stack([GroupedExperts._init(param.shape[1:], self._init_seed, e, name, 0.02) for e in ids])
            param.copy_(fresh.to(param.device, param.dtype))

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """Aux-loss-free balancing step (call once per optimizer step; no-op when bias_update_rate is 0)."""
        self.deepspeed_moe.gate.update_selection_bias(getattr(self, "dp_group", None))

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor,
                used_token: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if used_token is not None:
            raise ValueError("PiperMoE does not support used_token masks; drop padding tokens before the layer")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden states have last dim {hidden_states.shape[-1]}, "
                             f"but the layer's hidden_size is {self.hidden_size}")
        x_TD = hidden_states.reshape(-1, self.hidden_size)
        core = self.deepspeed_moe
        if self.placement.rank_of.device != x_TD.device:
            self.placement.to(x_TD.device)
        route = core.gate(x_TD)
        topk_idx = self._drop_over_capacity(route.topk_idx_TK)
        if hasattr(core.transport, "start"):  # flat: one host wait, chunks' all-to-alls under the experts
            chunks = self.config.overlap_chunks if self.ep_size > 1 else 1
            out, self.last_send_counts = overlapped.run(x_TD, topk_idx, route.topk_weights_TK, self.placement,
                                                        core.transport, self.ops, core.experts, chunks)
        else:  # a transport that plans its exchange (hierarchical): the phases one after the other
            state = dispatch.preprocess(x_TD, topk_idx, route.topk_weights_TK, self.placement, core.transport,
                                        self.ops)
            state = dispatch.dispatch(state, core.transport)
            h_ND = dispatch.postprocess(state, self.num_local_experts, self.ops)
            y_ND = core.experts(h_ND, state.tokens_per_slot_L)
            out = dispatch.combine(state, y_ND, core.transport, self.ops)
            self.last_send_counts = state.send_counts
        # last_send_counts: rows sent to each EP rank (host ints, for all-to-all accounting)
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(x_TD)
        l_aux = route.aux_loss + route.z_loss
        self.last_stats = {"tokens_per_expert": route.tokens_per_expert_E.detach(),
                           "dropped": (topk_idx < 0).sum().detach(), "assignments": torch.tensor(topk_idx.numel()),
                           "aux_loss": route.aux_loss.detach(), "z_loss": route.z_loss.detach()}
        return out.view(hidden_states.shape), l_aux, route.tokens_per_expert_E

    def _drop_over_capacity(self, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        cf = self.config.capacity_factor
        if cf is None:
            return topk_idx_TK
        T, K = topk_idx_TK.shape
        capacity = math.ceil(cf * T * K / self.num_experts)
        return reference.capacity_drop_reference(topk_idx_TK, self.num_experts, capacity)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={self.hidden_size}, experts={self.num_experts} (local {self.num_local_experts}), "
                f"d_ffn={self.d_ffn}, top_k={c.top_k}, ep_size={self.ep_size}, score={c.score_func}, "
                f"shared={c.n_shared_experts}, capacity={c.capacity_factor or 'dropless'}")
