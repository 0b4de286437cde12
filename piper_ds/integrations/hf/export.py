"""export(): a converted model written back as a Hugging Face checkpoint that ``from_pretrained`` reads.

Every rank of rank 0's EP group sends its experts to rank 0, which puts them in place by global id (the layer's
placement says which rank holds which expert), builds the model's state dict in transformers' own layout (fused
``experts.gate_up_proj`` [E, 2F, D] and ``experts.down_proj`` [E, D, F], the router, its bias, the shared
experts) and lets ``save_pretrained`` of a meta-device copy of the model write it: the config, the safetensors
shards and the per-expert key layout the checkpoints of that architecture use. Collective under expert
parallelism: every rank calls it.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from piper_ds.integrations.hf.architectures import Architecture
from piper_ds.integrations.hf.model import HFMoEModel
from piper_ds.moe import PiperMoE


def export(model: HFMoEModel, path: str) -> None:
    """Writes ``model`` (an :class:`HFMoEModel`; under ``piper_ds.initialize`` pass ``engine.module``) to the
    directory ``path`` as a Hugging Face checkpoint, in the dtype of its parameters. Every rank must call it;
    rank 0 writes, and every rank returns once the files are complete."""
    if not isinstance(model, HFMoEModel):
        raise TypeError(f"export takes the HFMoEModel that convert or load returned, got {type(model).__name__}")
    writer = not dist.is_initialized() or dist.get_rank() == 0
    blocks = model.blocks()
    state: Dict[str, torch.Tensor] = {}
    for name, block in blocks.items():
        experts = _gather_experts(name, block.moe)
        if writer:
            state.update(_block_state(name, block.moe, model.architecture, experts))
    if writer:
        prefixes = tuple(f"{name}." for name in blocks)
        for key, t in model.hf.state_dict().items():
            if not key.startswith(prefixes):
                state[key] = t.detach().cpu()
        with torch.device("meta"):  # only its config and layout are used: no memory
            skeleton = AutoModelForCausalLM.from_config(model.hf.config)
        skeleton.save_pretrained(path, state_dict=state)
    if dist.is_initialized():
        dist.barrier()


def _gather_experts(name: str, layer: PiperMoE) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(w_up [E, D, 2F], w_down [E, F, D]) of all experts by global id on rank 0 (CPU); None on other ranks."""
    experts = layer.deepspeed_moe.experts
    up, down = experts.w_up.detach(), experts.w_down.detach()
    if layer.ep_size == 1:
        return up.cpu(), down.cpu()
    group = layer.deepspeed_moe.ep_group
    if group is None:
        raise ValueError(f"{name}: the layer has ep_size {layer.ep_size} but no EP group yet; export under the "
                         "engine (piper_ds.initialize binds the groups) or after layer.bind_ep_group(group)")
    if 0 not in dist.get_process_group_ranks(group):
        return None  # a replica of experts that rank 0's EP group holds
    full = []
    for local in (up, down):
        parts = [torch.empty_like(local) for _ in range(layer.ep_size)] if dist.get_rank() == 0 else None
        dist.gather(local.contiguous(), parts, group=group, group_dst=0)
        if parts is not None:
            whole = torch.empty((layer.num_experts, *local.shape[1:]), dtype=local.dtype)
            for rank, part in enumerate(parts):
                whole[layer.placement.local_experts(rank)] = part.cpu()
            full.append(whole)
    return (full[0], full[1]) if full else None


def _block_state(name: str, layer: PiperMoE, arch: Architecture,
                 experts: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The Hugging Face block's state dict entries (names as in the model, prefixed ``name.``)."""
    gate = layer.deepspeed_moe.gate
    w_up, w_down = experts
    state = {f"{name}.gate.weight": gate.wg.weight,
             f"{name}.experts.gate_up_proj": w_up.transpose(1, 2),
             f"{name}.experts.down_proj": w_down.transpose(1, 2)}
    if arch.selection_bias is not None:
        state[f"{name}.gate.{arch.selection_bias}"] = gate.selection_bias
    if layer.shared_mlp is not None:
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            state[f"{name}.{arch.shared_expert}.{theirs}.weight"] = getattr(layer.shared_mlp, ours).weight
    if layer.shared_gate is not None:
        state[f"{name}.{arch.shared_expert_gate}.weight"] = layer.shared_gate.weight
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
