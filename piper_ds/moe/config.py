"""Configuration of one MoE layer: the ``"piper": {"moe": {...}}`` block of a ds_config.

Validated once, at the edge, by pydantic; unknown keys are errors (``extra="forbid"``) so that a typo never
silently falls back to a default.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MoEConfig(BaseModel):
    """Routing, dispatch and expert options of a :class:`piper_ds.moe.PiperMoE` layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- router -------------------------------------------------------------------------------------
    top_k: int = Field(2, ge=1, description="Experts per token (1..num_experts).")
    score_func: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="Router scores: softmax over experts (Mixtral) or per-expert sigmoid (DeepSeek-V3).")
    n_groups: int = Field(1, ge=1, description="Expert groups for group-limited routing (DeepSeek-V3: 8); 1 = off.")
    topk_groups: int = Field(1, ge=1, description="Groups a token may route into when n_groups > 1.")
    group_score: Literal["top2_sum", "max"] = Field(
        "top2_sum", description="How a group is scored for group-limited routing: the sum of its two best "
        "selection scores (DeepSeek-V3) or its best one (DeepSeek-V2's group_limited_greedy). 'max' runs the "
        "PyTorch router (the fused gating kernel computes 'top2_sum').")
    normalize_weights: bool = Field(
        True, description="Renormalise the top-k weights of a token to sum to 1 (before routed_scaling_factor).")
    routed_scaling_factor: float = Field(1.0, gt=0, description="Multiplies the routed weights (DeepSeek-V3: 2.5).")
    aux_loss_coef: float = Field(0.01, ge=0, description="Coefficient of the load-balancing loss; 0 = off.")
    aux_loss_type: Literal["switch", "first_choice"] = Field(
        "switch",
        description="'switch': E * sum_e P_e * f_e with f_e the share of all top-k assignments (GShard/Switch, "
        "DeepSpeed topkgating); 'first_choice': f_e from the first choice only (DeepSpeed's top-2 gate).")
    z_loss_coef: float = Field(0.0, ge=0, description="Coefficient of the router z-loss mean(logsumexp(logits)^2).")
    bias_update_rate: float = Field(
        0.0, ge=0,
        description="Aux-loss-free balancing: per-expert selection bias moved by this rate towards equal load "
        "after every training forward (DeepSeek-V3: 1e-3); 0 = off. The bias only selects, never weights.")
    use_selection_bias: bool = Field(
        False,
        description="Route with the selection bias also when bias_update_rate is 0: a fixed bias that comes with "
        "the weights (DeepSeek-V3's e_score_correction_bias). bias_update_rate > 0 implies it.")

    # ---- dispatch -----------------------------------------------------------------------------------
    capacity_factor: Optional[float] = Field(
        None, gt=0,
        description="None = dropless. Else each expert takes at most ceil(cf * T * k / E) assignments from a "
        "rank's T tokens; later tokens are dropped and the dropped fraction is reported.")
    transport: Literal["flat", "hierarchical", "auto"] = Field(
        "auto", description="All-to-all used by the dispatcher; 'auto' = hierarchical only across nodes.")
    node_dedup: bool = Field(
        False,
        description="Hierarchical transport only: a token bound for several ranks of one remote node crosses the "
        "network once (the node's lane receiver fans it out; the combine sums on that node before sending back). "
        "Needs transport 'hierarchical' or 'auto'; saves nothing within one node or with one rank per node.")
    overlap_chunks: int = Field(
        1, ge=1, le=64,
        description="With the flat transport: cut the layer's tokens into this many chunks whose all-to-alls run "
        "while another chunk's experts compute (forward and backward); 1 = no overlap. Either way the layer waits "
        "for the device once (the exchanged counts). Every chunk adds host work (launches, three exchanges): on "
        "one 4x H200 host the layer is host-bound and 2 chunks were slower than 1 (docs/pipeline.md); it can pay "
        "where the all-to-all is long against the host's work (EP over slower links). Unused at ep_size 1; refused "
        "with transport 'hierarchical'; with 'auto' resolving to hierarchical (EP across nodes) a warning says it "
        "is unused.")
    kernels: Literal["auto", "cuda", "reference"] = Field(
        "auto", description="Router, dispatch and activation kernels: the fused ops when built ('auto'), forced "
        "('cuda'), or PyTorch throughout ('reference'; the experts still use torch._grouped_mm on CUDA).")
    cuda_graph: bool = Field(
        False,
        description="ep_size 1 only: capture the layer's forward and backward as CUDA graphs (one per token count) "
        "and replay them, which removes the host's launch cost. Each forward must be followed by its backward "
        "before the layer's next forward (no pipeline micro-batches in flight, no activation checkpointing of "
        "the layer); eval and no-grad forwards run eagerly. See piper_ds/moe/graphed.py.")

    # ---- experts ------------------------------------------------------------------------------------
    activation: Literal["swiglu", "gelu"] = Field(
        "swiglu", description="SwiGLU experts (3 matrices) or GELU experts (2 matrices).")
    n_shared_experts: int = Field(0, ge=0, description="Always-on shared experts (DeepSeek style), fused as one "
                                  "dense FFN of n_shared_experts * d_ffn hidden units.")
    shared_d_ffn: Optional[int] = Field(
        None, ge=1, description="Hidden size of the fused shared FFN when it is not n_shared_experts * d_ffn "
        "(Qwen2-MoE's shared_expert_intermediate_size); needs n_shared_experts >= 1.")
    shared_gate: bool = Field(
        False, description="Scale the shared experts' output per token by sigmoid(x . w_gate), w_gate [D] a "
        "learned weight (Qwen2-MoE's shared_expert_gate); needs n_shared_experts >= 1.")

    @model_validator(mode="after")
    def _check_groups(self) -> "MoEConfig":
        if self.topk_groups > self.n_groups:
            raise ValueError(f"topk_groups ({self.topk_groups}) must be <= n_groups ({self.n_groups})")
        if self.overlap_chunks > 1 and self.transport == "hierarchical":
            raise ValueError(f"overlap_chunks ({self.overlap_chunks}) needs transport 'flat' or 'auto' (it overlaps "
                             f"the flat all-to-all), got transport {self.transport!r}")
        if self.cuda_graph and self.kernels == "reference":
            raise ValueError("cuda_graph needs the fused kernels (kernels 'auto' or 'cuda'): the PyTorch reference "
                             "plans wait for the device, which a CUDA graph cannot capture")
        if (self.shared_d_ffn is not None or self.shared_gate) and self.n_shared_experts == 0:
            raise ValueError(f"shared_d_ffn ({self.shared_d_ffn}) and shared_gate ({self.shared_gate}) need "
                             f"n_shared_experts >= 1, got n_shared_experts {self.n_shared_experts}")
        if self.node_dedup and self.transport == "flat":
            raise ValueError(f"node_dedup ({self.node_dedup}) needs transport 'hierarchical' or 'auto', got "
                             f"transport {self.transport!r}")
        return self

    def validate_for(self, num_experts: int) -> None:
        """Checks the options that depend on the layer's expert count; raises ValueError naming the values."""
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be between 1 and num_experts ({num_experts})")
        if num_experts % self.n_groups:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by n_groups ({self.n_groups})")
        if self.n_groups > 1 and self.top_k > self.topk_groups * (num_experts // self.n_groups):
            raise ValueError(f"top_k ({self.top_k}) exceeds the experts reachable in topk_groups "
                             f"({self.topk_groups}) groups of {num_experts // self.n_groups}")
