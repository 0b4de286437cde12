"""HFMoEModel: a Hugging Face causal LM whose MoE blocks run as PiperMoE, with the loss transformers defines."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from piper_ds.integrations.hf.architectures import Architecture, BlockSpec, architecture_of, find_blocks
from piper_ds.integrations.hf.block import AuxCollector, HFMoEBlock
from piper_ds.moe import PiperMoE


class HFMoEModel(nn.Module):
    """The converted model (built by :func:`piper_ds.integrations.hf.convert` or :func:`~.load`).

    ``hf`` is the Hugging Face ``...ForCausalLM`` itself, its MoE blocks replaced by :class:`HFMoEBlock`
    (attention, norms, embeddings and dense layers are its own). ``forward`` takes the causal LM's arguments
    (``input_ids`` [B, S], ``attention_mask`` [B, S], ``labels`` [B, S], ...) and returns its output: ``logits``
    [B, S, V] and, with ``labels``, ``loss`` = cross-entropy + ``router_aux_loss_coef`` x ``aux_loss`` when the
    load-balancing loss is on (``output_router_logits``, argument or config, as in transformers). ``aux_loss`` is
    transformers' load-balancing loss (unscaled; architectures without one have no such field);
    ``router_logits`` are not returned. For generation call ``model.hf.generate``.

    Under ``piper_ds.initialize`` train it as the Hugging Face model: ``engine(input_ids=ids, labels=ids).loss``.
    """

    def __init__(self, hf_model: nn.Module, architecture: Architecture, spec: BlockSpec, ep_size: int,
                 collector: AuxCollector):
        super().__init__()
        self.hf = hf_model
        self.architecture, self.spec, self.ep_size = architecture, spec, ep_size
        self.collector = collector

    @property
    def config(self) -> Any:
        """The Hugging Face config."""
        return self.hf.config

    @property
    def aux_loss_coef(self) -> float:
        """The model's ``router_aux_loss_coef`` (0.0 for architectures without a load-balancing loss)."""
        return self.spec.aux_loss_coef

    def blocks(self) -> Dict[str, HFMoEBlock]:
        """The converted blocks by their name inside ``hf`` (``model.layers.3.mlp``)."""
        return {name: m for name, m in self.hf.named_modules() if isinstance(m, HFMoEBlock)}

    def moe_layers(self) -> List[PiperMoE]:
        """The PiperMoE layers, in model order."""
        return [b.moe for b in self.blocks().values()]

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, output_router_logits: Optional[bool] = None,
                **kwargs: Any) -> Any:
        if kwargs.get("return_dict") is False:
            raise ValueError("HFMoEModel returns the model output object; return_dict=False is not supported")
        arch = self.architecture
        if output_router_logits is None:
            output_router_logits = arch.has_aux_loss and self.hf.config.output_router_logits
        wanted = arch.has_aux_loss and bool(output_router_logits)
        # transformers records router logits from its own router modules, gone here: the blocks collect instead
        extra = {"output_router_logits": False} if arch.has_aux_loss else {}
        mask = attention_mask.reshape(-1) if wanted and attention_mask is not None else None
        with self.collector.forward(wanted, mask) as stats:
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra, **kwargs)
        if not wanted:
            return out
        aux = stats.load_balancing_loss()
        if out.loss is not None and aux is not None:
            out.loss = out.loss + self.spec.aux_loss_coef * aux.to(out.loss.device)
        out.aux_loss = aux
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token for MFU (:func:`flops_per_token` of this model's config)."""
        return flops_per_token(self.hf.config, seq_len)


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token of the Hugging Face MoE model of ``config`` for MFU, ``6 * N + 6 * L * seq_len * d``
    as everywhere in piper_ds: N the active parameters without the embedding lookup (top_k of the E routed
    experts per MoE layer), L the decoder layers, d the hidden size. Counted on a meta-device copy of the model
    (no memory), so it holds for the model however it is run."""
    architecture = architecture_of(config)
    spec = architecture.block_spec(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    routed = sum(p.numel() for block in find_blocks(model, architecture).values() for p in block.experts.parameters())
    active = sum(p.numel() for p in model.parameters()) - routed + routed * spec.moe["top_k"] / spec.num_experts
    if not config.tie_word_embeddings:
        active -= model.get_input_embeddings().weight.numel()
    return 6.0 * active + 6.0 * config.num_hidden_layers * seq_len * spec.hidden_size
