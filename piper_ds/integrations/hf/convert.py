"""convert(): the MoE blocks of a Hugging Face causal LM replaced by PiperMoE layers of the same function.

The routing comes from the model (see ``architectures.py``); the dispatch and kernel options from the caller's
``config``. Each rank builds its layers with the experts the placement gives its EP rank and copies in only
those; where the weights come from is an :class:`ExpertSource` (the model's own tensors here, the safetensors
files for :func:`piper_ds.integrations.hf.load`).
"""
from __future__ import annotations

import abc
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from piper_ds.integrations.hf.architectures import Architecture, BlockSpec, architecture_of, find_blocks
from piper_ds.integrations.hf.block import AuxCollector, HFMoEBlock
from piper_ds.integrations.hf.model import HFMoEModel
from piper_ds.moe import MoEConfig, PiperMoE

#: MoEConfig fields that a converted model takes from the Hugging Face model: its routing function, experts and
#: losses. ``aux_loss_coef`` and ``z_loss_coef`` are 0 in the layers: the model's loss is transformers' (its
#: load-balancing loss is added by HFMoEModel).
MODEL_FIELDS = ("top_k", "score_func", "n_groups", "topk_groups", "group_score", "normalize_weights",
                "routed_scaling_factor", "use_selection_bias", "activation", "n_shared_experts", "shared_d_ffn",
                "shared_gate", "aux_loss_coef", "aux_loss_type", "z_loss_coef")


class ExpertSource(abc.ABC):
    """Where the routed experts' weights of a converted block come from."""

    @abc.abstractmethod
    def read(self, block_name: str, block: nn.Module, global_ids: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(w_up [L, D, 2F], w_down [L, F, D])`` of experts ``global_ids`` (in that order) of the Hugging Face
        block ``block`` named ``block_name`` (``model.layers.3.mlp``); ``w_up`` holds gate | up."""


class ModuleExperts(ExpertSource):
    """The block's own fused tensors: ``experts.gate_up_proj`` [E, 2F, D] and ``experts.down_proj`` [E, D, F]."""

    def __init__(self, spec: BlockSpec):
        self.spec = spec

    def read(self, block_name, block, global_ids):
        s = self.spec
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        want = {"gate_up_proj": (s.num_experts, 2 * s.d_ffn, s.hidden_size),
                "down_proj": (s.num_experts, s.hidden_size, s.d_ffn)}
        for name, t in (("gate_up_proj", gate_up), ("down_proj", down)):
            if tuple(t.shape) != want[name]:
                raise ValueError(f"{block_name}.experts.{name} has shape {tuple(t.shape)}, expected {want[name]} "
                                 "(transformers 5.x fused experts)")
        ids = torch.tensor(global_ids, device=gate_up.device)
        return gate_up.detach()[ids].transpose(1, 2), down.detach()[ids].transpose(1, 2)


def moe_config_for(architecture: Architecture, spec: BlockSpec,
                   config: Union[MoEConfig, Dict[str, Any], None]) -> MoEConfig:
    """The MoEConfig of every converted layer: the model's routing (``MODEL_FIELDS``) and the caller's other
    options. A routing field the caller set to another value than the model's is a ValueError."""
    user = config if isinstance(config, MoEConfig) else MoEConfig(**dict(config or {}))
    model = {name: MoEConfig.model_fields[name].default for name in MODEL_FIELDS}
    model.update(spec.moe, aux_loss_coef=0.0, z_loss_coef=0.0)
    for name in sorted(user.model_fields_set & set(MODEL_FIELDS)):
        if getattr(user, name) != model[name]:
            raise ValueError(f"MoE option {name} ({getattr(user, name)!r}) contradicts the {architecture.model_type} "
                             f"model's {name} ({model[name]!r}): a converted model keeps the model's routing")
    return MoEConfig(**{**user.model_dump(), **model})


def convert(model: PreTrainedModel, config: Union[MoEConfig, Dict[str, Any], None] = None, ep_size: int = 1,
            ep_rank: Optional[int] = None) -> HFMoEModel:
    """Replaces, in place, every MoE block of the Hugging Face causal LM ``model`` (Mixtral, Qwen3-MoE,
    Qwen2-MoE, OLMoE, DeepSeek-V2/V3: ``architectures.ARCHITECTURES``) by a :class:`PiperMoE` with the same
    routing and weights, and returns the model wrapped as :class:`HFMoEModel`.

    Args:
        model: a transformers ``...ForCausalLM`` (weights on any device, any dtype; the layers take them).
        config: PiperMoE options (``MoEConfig`` or dict): dispatch, kernels, capacity, aux-loss-free bias
            updates... The routing and loss fields (``MODEL_FIELDS``) come from the model; setting one to another
            value is a ValueError. ``capacity_factor`` (dropping tokens) changes the model's function.
        ep_size: expert-parallel size; must divide the number of experts.
        ep_rank: the EP rank whose experts this process keeps (default: ``rank % ep_size`` of the initialised
            process group; at ep_size > 1 without a process group it must be given); with a process group it must
            be that value.

    The layers hold only the experts of ``ep_rank``; the model's full expert tensors are dropped with the
    replaced blocks. ValueError for an unsupported architecture (naming the supported ones), a model without
    MoE blocks, or options PiperMoE cannot compute.
    """
    if not isinstance(model, PreTrainedModel) or not isinstance(model, GenerationMixin):
        raise TypeError(f"convert takes a Hugging Face causal LM (a transformers ...ForCausalLM), got "
                        f"{type(model).__name__}")
    architecture = architecture_of(model.config)
    spec = architecture.block_spec(model.config)
    return convert_blocks(model, architecture, spec, config, ep_size, ep_rank, ModuleExperts(spec))


def convert_blocks(model: PreTrainedModel, architecture: Architecture, spec: BlockSpec,
                   config: Union[MoEConfig, Dict[str, Any], None], ep_size: int, ep_rank: Optional[int],
                   source: ExpertSource) -> HFMoEModel:
    """:func:`convert` with the routed experts read from ``source`` (the rest of each block from the block)."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
    if spec.num_experts % ep_size:
        raise ValueError(f"the {architecture.model_type} model has {spec.num_experts} experts per MoE layer, "
                         f"which ep_size ({ep_size}) does not divide")
    ep_rank = _check_ep_rank(ep_size, ep_rank)
    cfg = moe_config_for(architecture, spec, config)
    blocks = find_blocks(model, architecture)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE blocks ({architecture.block_class}) to convert")
    collector = AuxCollector()
    for name in list(blocks):
        block = blocks.pop(name)  # the last reference once replaced: its full expert tensors go block by block
        layer = _build_layer(name, block, architecture, spec, cfg, ep_size, ep_rank, source)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, HFMoEBlock(layer, collector))
        del block
    return HFMoEModel(model, architecture, spec, ep_size, collector)


def _check_ep_rank(ep_size: int, ep_rank: Optional[int]) -> int:
    # PiperMoE binds the EP rank that DeepSpeed's consecutive EP groups give this process
    expected = dist.get_rank() % ep_size if dist.is_initialized() else None
    if ep_rank is None:
        if expected is None and ep_size > 1:
            raise ValueError(f"ep_size {ep_size} > 1 and no process group: initialise it first "
                             "(deepspeed.init_distributed()) so that each rank loads its own experts, or pass ep_rank")
        return 0 if expected is None else expected
    if not isinstance(ep_rank, int) or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank ({ep_rank!r}) must be an int in [0, ep_size ({ep_size}))")
    if expected is not None and ep_rank != expected:
        raise ValueError(f"ep_rank ({ep_rank}) differs from this process's EP rank ({expected} = rank "
                         f"{dist.get_rank()} % ep_size {ep_size})")
    return ep_rank


@torch.no_grad()
def _build_layer(name: str, block: nn.Module, architecture: Architecture, spec: BlockSpec, cfg: MoEConfig,
                 ep_size: int, ep_rank: int, source: ExpertSource) -> PiperMoE:
    """A PiperMoE holding ``block``'s router, shared experts and the experts of ``ep_rank``, on the block's device
    and in its dtype."""
    router = block.gate.weight
    layer = PiperMoE(spec.hidden_size, spec.num_experts, spec.d_ffn, ep_size=ep_size, config=cfg)
    gate = layer.deepspeed_moe.gate
    gate.wg.weight.copy_(router)
    if architecture.selection_bias is not None:
        gate.selection_bias.copy_(getattr(block.gate, architecture.selection_bias))
    if layer.shared_mlp is not None:
        shared = getattr(block, architecture.shared_expert)
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            getattr(layer.shared_mlp, ours).weight.copy_(getattr(shared, theirs).weight)
    if layer.shared_gate is not None:
        layer.shared_gate.weight.copy_(getattr(block, architecture.shared_expert_gate).weight)
    w_up, w_down = source.read(name, block, layer.placement.local_experts(ep_rank))
    layer.load_local_experts(w_up, w_down, ep_rank)
    return layer.to(device=router.device, dtype=router.dtype).train(block.training)
