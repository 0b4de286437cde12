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

from piper_ds.comm.transports import make_transport
from piper_ds.moe.config import MoEConfig
from piper_ds.moe.dispatcher import Dispatcher, make_dispatcher
from piper_ds.moe.experts import GroupedExperts
from piper_ds.moe.graphed import GraphedLayer
from piper_ds.moe.placement import ExpertPlacement
from piper_ds.moe.router import TopKGateFP32
from piper_ds.ops import reference
from piper_ds.ops.experts import dense_mlp


class FeedForward(nn.Module):
    """Dense SwiGLU/GELU FFN without biases (shared experts, dense layers): ``w2(act(w1(x)) [* w3(x)])``.

    ``kernels`` ("auto" | "cuda" | "cpu" | "reference", the ops' backends): with the compiled activation op
    the gate and up projections run as one GEMM into the fused SwiGLU/GELU, and backward keeps only the input and
    the up projection's output; "reference" is PyTorch's autograd over ``silu(gate) * up`` in the input's dtype
    (:func:`piper_ds.ops.experts.dense_mlp`).
    The parameters stay three ``nn.Linear`` (w1 gate, w3 up, w2 down), so checkpoints keep their keys; their
    weights are read here rather than through the Linears' forward (ZeRO-3, which would gather them in that
    forward, is refused for MoE models).
    """

    def __init__(self, hidden_size: int, d_ffn: int, activation: str = "swiglu", kernels: str = "auto"):
        super().__init__()
        if kernels not in ("auto", "cuda", "cpu", "reference"):
            raise ValueError(f"kernels must be 'auto', 'cuda', 'cpu' or 'reference', got {kernels!r}")
        self.swiglu, self.activation, self.kernels = activation == "swiglu", activation, kernels
        self.w1 = nn.Linear(hidden_size, d_ffn, bias=False)
        self.w3 = nn.Linear(hidden_size, d_ffn, bias=False) if self.swiglu else None
        self.w2 = nn.Linear(d_ffn, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_up = torch.cat((self.w1.weight, self.w3.weight)) if self.swiglu else self.w1.weight
        return dense_mlp(x, w_up, self.w2.weight, self.activation, self.kernels)


class _MoECore(nn.Module):
    """Router + local experts + the dispatcher; lives at ``<layer>.deepspeed_moe`` like DeepSpeed's MOELayer."""

    def __init__(self, gate: TopKGateFP32, experts: GroupedExperts, dispatcher: Dispatcher):
        super().__init__()
        self.gate, self.experts, self.dispatcher = gate, experts, dispatcher
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:  # DeepSpeed's MOELayer hook, called by set_deepspeed_parallelism
        self.ep_group = ep_group


_SIDE_STREAMS: Dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One stream per device for the shared experts (kept out of the module: streams do not deep-copy)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


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
    MoE; ``l_aux`` already carries the coefficients (aux + z loss): add it to the training loss. On CUDA the
    shared experts run on a side stream while the routed experts run, joined before the sum.
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
        if cfg.cuda_graph and ep_size > 1:
            raise ValueError(f"cuda_graph needs ep_size 1 (the all-to-all's counts reach the host), got ep_size "
                             f"{ep_size}")
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
        # until the engine binds the EP group (bind_ep_group), only ep_size 1 can dispatch
        dispatcher = make_dispatcher(self.placement, cfg.kernels) if ep_size == 1 else _Unbound(ep_size)
        self.deepspeed_moe = _MoECore(gate, experts, dispatcher)
        self._init_seed = init_seed
        self.dp_group = None
        shared_width = cfg.shared_d_ffn or cfg.n_shared_experts * d_ffn
        self.shared_mlp = FeedForward(hidden_size, shared_width, cfg.activation, cfg.kernels) \
            if cfg.n_shared_experts else None
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if cfg.shared_gate else None
        if cfg.kernels != "reference" and cfg.group_score == "top2_sum":  # the kernel's only group score
            from piper_ds.ops import gating
            gate.gating_fn = functools.partial(gating.fused_gating, backend=cfg.kernels)
        self._graphed = GraphedLayer(self) if cfg.cuda_graph else None
        self.last_stats: Dict[str, Any] = {}

    # ---------------------------------------------------------------------------------- parallelism
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Creates (or reuses) DeepSpeed's EP/expert-DP groups, then binds this rank's experts and dispatcher."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world % self.ep_size:
            raise ValueError(f"ep_size ({self.ep_size}) must divide the world size ({world})")
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        from deepspeed.utils import groups
        self.bind_ep_group(self.deepspeed_moe.ep_group, groups._get_data_parallel_group())

    def bind_ep_group(self, ep_group, dp_group=None, topology=None) -> None:
        """Uses ``ep_group`` for the all-to-all (over ``topology``'s nodes: a :class:`Topology`, a gpus-per-node
        int, or None for the launcher's) and ``dp_group`` for bias updates; builds the dispatcher; re-draws this
        rank's experts if the layer was built for another EP rank, so each rank holds the experts the placement
        gives it. The one place a layer's transport and dispatcher are made."""
        self.deepspeed_moe.ep_group, self.dp_group = ep_group, dp_group
        size = dist.get_world_size(ep_group) if ep_group is not None and dist.is_initialized() else 1
        if size != self.ep_size:
            raise ValueError(f"EP group has {size} ranks but the layer was built with ep_size={self.ep_size}")
        ep_rank = dist.get_rank(ep_group) if size > 1 else 0
        cfg = self.config
        transport = make_transport(cfg.transport, ep_group, topology, node_dedup=cfg.node_dedup) if size > 1 \
            else None
        if transport is not None and cfg.overlap_chunks > 1 and transport.capabilities.plans_exchange:
            warnings.warn(f"PiperMoE: overlap_chunks={cfg.overlap_chunks} is not used: transport 'auto' chose the "
                          "hierarchical all-to-all (the EP group spans nodes), which runs unchunked")
        timer = self.deepspeed_moe.dispatcher.timer
        self.deepspeed_moe.dispatcher = make_dispatcher(self.placement, cfg.kernels, transport, cfg.overlap_chunks)
        self.deepspeed_moe.dispatcher.timer = timer
        if ep_rank != self.ep_rank:  # built for another EP rank: hold the experts the placement gives this one
            if self._init_seed is None:
                raise ValueError(f"this PiperMoE holds the loaded experts of EP rank {self.ep_rank} "
                                 f"({self.placement.local_experts(self.ep_rank)}) but is bound as EP rank {ep_rank}: "
                                 "load the experts of that rank instead")
            self.ep_rank = ep_rank
            self.deepspeed_moe.experts.init_experts(self.placement.local_experts(ep_rank), self._init_seed)

    @torch.no_grad()
    def load_local_experts(self, w_up_LDW: torch.Tensor, w_down_LFD: torch.Tensor,
                           ep_rank: Optional[int] = None) -> None:
        """Copies given (e.g. pretrained) weights of this rank's experts into the stacked parameters.

        ``w_up_LDW`` [E_local, D, W] (SwiGLU: gate | up side by side, W = 2F; GELU: W = F) and ``w_down_LFD``
        [E_local, F, D] hold the experts ``placement.local_experts(ep_rank)`` in slot order; ``ep_rank`` defaults
        to the layer's. Afterwards the layer belongs to that EP rank: binding it as another one is a ValueError
        (its experts would be other weights), where a randomly initialised layer would draw them again.
        """
        experts = self.deepspeed_moe.experts
        rank = self.ep_rank if ep_rank is None else ep_rank
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"ep_rank ({rank}) must be in [0, ep_size ({self.ep_size}))")
        for name, given, param in (("w_up", w_up_LDW, experts.w_up), ("w_down", w_down_LFD, experts.w_down)):
            if tuple(given.shape) != tuple(param.shape):
                raise ValueError(f"{name}: got shape {tuple(given.shape)}, the layer's local experts need "
                                 f"{tuple(param.shape)} (E_local {self.num_local_experts} of {self.num_experts})")
            param.copy_(given)
        self.ep_rank, self._init_seed = rank, None

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """Aux-loss-free balancing step (call once per optimizer step; no-op when bias_update_rate is 0)."""
        self.deepspeed_moe.gate.update_selection_bias(self.dp_group)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor,
                used_token: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if used_token is not None:
            raise ValueError("PiperMoE does not support used_token masks; drop padding tokens before the layer")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden states have last dim {hidden_states.shape[-1]}, "
                             f"but the layer's hidden_size is {self.hidden_size}")
        x_TD = hidden_states.reshape(-1, self.hidden_size)
        if self.placement.rank_of.device != x_TD.device:
            self.placement.to(x_TD.device)
        if self._graphed is not None and self._graphed.applies(x_TD):
            out, l_aux, counts, dropped, aux, z = self._graphed(x_TD)
        else:
            out, l_aux, counts, dropped, aux, z = self.layer_tensors(x_TD)
        self.last_stats = {"tokens_per_expert": counts.detach(), "dropped": dropped.detach(),
                           "assignments": x_TD.shape[0] * self.config.top_k, "aux_loss": aux.detach(),
                           "z_loss": z.detach()}
        return out.view(hidden_states.shape), l_aux, counts

    def layer_tensors(self, x_TD: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The layer on [T, D] rows: (out [T, D], l_aux, tokens_per_expert [E], dropped, aux loss, z loss), all
        tensors (what a CUDA graph of the layer captures)."""
        core = self.deepspeed_moe
        route = core.gate(x_TD)
        topk_idx = self._drop_over_capacity(route.topk_idx_TK)
        shared = self._start_shared(x_TD)
        routed = core.dispatcher(x_TD, topk_idx, route.topk_weights_TK, core.experts,
                                 bounded=self.config.capacity_factor is not None)
        out = routed if shared is None else routed + self._join_shared(shared)
        aux, z = core.gate.losses(route)  # after the experts are launched: these kernels must not delay them
        dropped = (topk_idx < 0).sum()
        return out, aux + z, route.tokens_per_expert_E, dropped, aux, z

    def _start_shared(self, x_TD: torch.Tensor):
        """The shared experts' output, started on a side stream on CUDA (so they run beside the routed path)."""
        if self.shared_mlp is None:
            return None
        if not x_TD.is_cuda:
            return self._shared(x_TD)
        main, side = torch.cuda.current_stream(x_TD.device), _side_stream(x_TD.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            y = self._shared(x_TD)
        if not torch.cuda.is_current_stream_capturing():  # a captured graph keeps its memory anyway
            x_TD.record_stream(side)  # x's memory must outlive the side stream's use of it
        return y

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The shared experts' output [T, D], scaled per token by sigmoid(x . w_gate) with ``shared_gate``."""
        y = self.shared_mlp(x_TD)
        return y if self.shared_gate is None else torch.sigmoid(self.shared_gate(x_TD)) * y

    @staticmethod
    def _join_shared(y: torch.Tensor) -> torch.Tensor:
        if y.is_cuda:
            main = torch.cuda.current_stream(y.device)
            main.wait_stream(_side_stream(y.device))
            if not torch.cuda.is_current_stream_capturing():
                y.record_stream(main)  # made on the side stream, read and freed on this one
        return y

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


class _Unbound(Dispatcher):
    """The dispatcher of an ep_size > 1 layer before its EP group is bound: refuses to run."""

    def __init__(self, ep_size: int):
        super().__init__(None, "reference")
        self.ep_size = ep_size

    def __call__(self, *args, **kwargs):
        raise ValueError(f"this PiperMoE has ep_size {self.ep_size} but no EP group yet: run it under the engine "
                         "(piper_ds.initialize binds the groups) or call layer.bind_ep_group(group) first")
