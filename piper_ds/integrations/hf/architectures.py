"""The Hugging Face MoE architectures piper_ds converts, keyed by the config's ``model_type``.

Each entry says where the architecture's MoE block is (its class in ``transformers.models.<type>``), how its
routing reads as :class:`piper_ds.moe.MoEConfig` fields, where its shared experts and router bias live, and how
its checkpoints name the experts. The routing functions read the Hugging Face config and refuse (ValueError)
every option PiperMoE cannot compute exactly, so a converted model never computes another function.

Routing of transformers 5.17 (the version pinned by the ``hf`` extra), per architecture:

=============  ========  ===================  ==============================  ===================================
model_type     scores    renormalise top-k    groups / bias / scaling          shared experts
=============  ========  ===================  ==============================  ===================================
mixtral        softmax   always               -                                -
qwen3_moe      softmax   ``norm_topk_prob``   -                                -
qwen2_moe      softmax   ``norm_topk_prob``   -                                one, own width, sigmoid gate
olmoe          softmax   ``norm_topk_prob``   -                                -
deepseek_v2    softmax   never (*)            ``group_limited_greedy``: max    ``n_shared_experts``
                                              group score; scaling factor
deepseek_v3    sigmoid   ``norm_topk_prob``   top-2-sum groups, fixed          ``n_shared_experts``
                                              selection bias, scaling factor
=============  ========  ===================  ==============================  ===================================

(*) transformers' DeepSeek-V2 router ignores ``norm_topk_prob``; the converted model computes what it computes.
Experts are SwiGLU with SiLU in all of them (``hidden_act`` must be ``silu``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn


@dataclass(frozen=True)
class BlockSpec:
    """Shape and routing of every MoE block of one model.

    ``moe`` holds the :class:`MoEConfig` fields the architecture fixes (routing, activation, shared experts);
    ``aux_loss_coef`` is the model's ``router_aux_loss_coef`` (0.0 for architectures without an aux loss).
    """

    hidden_size: int
    num_experts: int
    d_ffn: int
    moe: Dict[str, Any]
    aux_loss_coef: float


@dataclass(frozen=True)
class Architecture:
    """Where a Hugging Face MoE architecture keeps what PiperMoE needs.

    ``block_class``: the MoE block's class name in ``transformers.models.<model_type>.modeling_<model_type>``
    (it has a router ``gate`` with ``weight`` [E, D] and fused experts ``experts.gate_up_proj`` [E, 2F, D],
    ``experts.down_proj`` [E, D, F]). ``checkpoint_block``: the block's name in checkpoint keys;
    ``expert_weights``: the per-expert checkpoint names of (gate, up, down) projections; ``shared_expert`` /
    ``shared_expert_gate``: attributes of the block (None: none); ``selection_bias``: the router buffer that
    biases selection only; ``has_aux_loss``: the causal LM adds ``router_aux_loss_coef`` x its load-balancing
    loss when asked (``output_router_logits``).
    """

    model_type: str
    block_class: str
    routing: Callable[[Any], Dict[str, Any]]
    checkpoint_block: str = "mlp"  # the block's attribute in the model is always ``mlp``
    expert_weights: Tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert: Optional[str] = None
    shared_expert_gate: Optional[str] = None
    selection_bias: Optional[str] = None
    has_aux_loss: bool = True

    def checkpoint_key(self, name: str) -> str:
        """A model's parameter name as checkpoints write it (``.mlp.`` -> ``.block_sparse_moe.`` for Mixtral)."""
        return name.replace(".mlp.", f".{self.checkpoint_block}.") if self.checkpoint_block != "mlp" else name

    def model_key(self, key: str) -> str:
        """A checkpoint key as the model's parameter name (inverse of :meth:`checkpoint_key`)."""
        return key.replace(f".{self.checkpoint_block}.", ".mlp.") if self.checkpoint_block != "mlp" else key

    def moe_block_class(self) -> type:
        """The transformers class of this architecture's MoE block."""
        module = importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")
        return getattr(module, self.block_class)

    def block_spec(self, config: Any) -> BlockSpec:
        """The :class:`BlockSpec` of a model with Hugging Face config ``config``; ValueError for options PiperMoE
        cannot compute (named with their values)."""
        _check_common(config)
        fields = self.routing(config)
        coef = float(config.router_aux_loss_coef) if self.has_aux_loss else 0.0
        return BlockSpec(hidden_size=int(config.hidden_size), num_experts=int(fields.pop("num_experts")),
                         d_ffn=int(fields.pop("d_ffn")), moe={"activation": "swiglu", **fields}, aux_loss_coef=coef)


def _check_common(config: Any) -> None:
    if config.hidden_act != "silu":
        raise ValueError(f"{config.model_type}: hidden_act {config.hidden_act!r} is not supported; PiperMoE's "
                         "gated experts compute silu(gate) * up (hidden_act 'silu')")
    # a config key that only quantized checkpoints have
    quantization = config.to_dict().get("quantization_config")
    if quantization is not None:
        raise ValueError(f"{config.model_type}: quantized checkpoints ({quantization!r}) are not supported")


def _mixtral(c: Any) -> Dict[str, Any]:
    if c.router_jitter_noise:
        raise ValueError(f"mixtral: router_jitter_noise ({c.router_jitter_noise}) is not supported (PiperMoE's "
                         "router has no input jitter); set it to 0.0")
    return dict(num_experts=c.num_local_experts, d_ffn=c.intermediate_size, top_k=c.num_experts_per_tok,
                score_func="softmax", normalize_weights=True)


def _qwen_olmoe(c: Any, d_ffn: int) -> Dict[str, Any]:
    return dict(num_experts=c.num_experts, d_ffn=d_ffn, top_k=c.num_experts_per_tok, score_func="softmax",
                normalize_weights=bool(c.norm_topk_prob))


def _qwen3_moe(c: Any) -> Dict[str, Any]:
    return _qwen_olmoe(c, c.moe_intermediate_size)


def _qwen2_moe(c: Any) -> Dict[str, Any]:
    return dict(_qwen_olmoe(c, c.moe_intermediate_size), n_shared_experts=1,
                shared_d_ffn=c.shared_expert_intermediate_size, shared_gate=True)


def _olmoe(c: Any) -> Dict[str, Any]:
    return _qwen_olmoe(c, c.intermediate_size)


def _shared(c: Any) -> Dict[str, Any]:
    """DeepSeek's shared experts: one dense FFN of n_shared_experts x moe_intermediate_size units (none if 0)."""
    return dict(n_shared_experts=int(c.n_shared_experts or 0))


def _deepseek_v2(c: Any) -> Dict[str, Any]:
    if c.mlp_bias:
        raise ValueError(f"deepseek_v2: mlp_bias ({c.mlp_bias}) is not supported: PiperMoE's shared experts have "
                         "no biases")
    fields = dict(num_experts=c.n_routed_experts, d_ffn=c.moe_intermediate_size, top_k=c.num_experts_per_tok,
                  score_func="softmax", normalize_weights=False, routed_scaling_factor=c.routed_scaling_factor,
                  **_shared(c))
    if c.topk_method == "group_limited_greedy":
        fields.update(n_groups=c.n_group, topk_groups=c.topk_group, group_score="max")
    elif c.topk_method != "greedy":
        raise ValueError(f"deepseek_v2: topk_method {c.topk_method!r} is not supported; supported: 'greedy', "
                         "'group_limited_greedy'")
    return fields


def _deepseek_v3(c: Any) -> Dict[str, Any]:
    return dict(num_experts=c.n_routed_experts, d_ffn=c.moe_intermediate_size, top_k=c.num_experts_per_tok,
                score_func="sigmoid", n_groups=c.n_group or 1, topk_groups=c.topk_group or 1,
                normalize_weights=bool(c.norm_topk_prob), routed_scaling_factor=c.routed_scaling_factor,
                use_selection_bias=True, **_shared(c))


ARCHITECTURES: Dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("mixtral", "MixtralSparseMoeBlock", _mixtral, checkpoint_block="block_sparse_moe",
                 expert_weights=("w1", "w3", "w2")),
    Architecture("qwen3_moe", "Qwen3MoeSparseMoeBlock", _qwen3_moe),
    Architecture("qwen2_moe", "Qwen2MoeSparseMoeBlock", _qwen2_moe, shared_expert="shared_expert",
                 shared_expert_gate="shared_expert_gate"),
    Architecture("olmoe", "OlmoeSparseMoeBlock", _olmoe),
    Architecture("deepseek_v2", "DeepseekV2Moe", _deepseek_v2, shared_expert="shared_experts", has_aux_loss=False),
    Architecture("deepseek_v3", "DeepseekV3MoE", _deepseek_v3, shared_expert="shared_experts",
                 selection_bias="e_score_correction_bias", has_aux_loss=False),
)}


def architecture_of(config: Any) -> Architecture:
    """The :class:`Architecture` for a Hugging Face config; ValueError naming the supported model types."""
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not a supported MoE architecture; supported: "
                         f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def find_blocks(model: nn.Module, architecture: Architecture) -> Dict[str, nn.Module]:
    """The MoE blocks of ``model`` by qualified name (``model.layers.3.mlp``), in module order."""
    cls = architecture.moe_block_class()
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}
