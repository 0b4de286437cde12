"""The reference DeepSeek-MoE-style causal LM, built from a :class:`piper_ds.system.specs.ModelSpec`.

A flat sequence ``Embedding -> Block x L -> Head`` (see :meth:`MoETransformer.layers`) so that a pipeline
engine can cut it into stages; every layer maps ``(h, aux)`` to ``(h, aux)`` with the MoE aux loss carried as
an fp32 scalar. The first ``n_dense_layers`` blocks use a dense FFN, the others a :class:`PiperMoE` (or the
stock ``deepspeed.moe.layer.MoE`` for side-by-side runs) with the shared experts fused in.

Parameter counts equal ``ModelSpec.param_counts()`` exactly (see the counting convention in specs.py).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from piper_ds.config import merge_moe_with_model
from piper_ds.models.layers import Attention, Block, DenseFFN, Embedding, Head, PiperMoEFFN
from piper_ds.moe import FeedForward, MoEConfig, PiperMoE
from piper_ds.system.specs import ModelSpec


class MoETransformer(nn.Module):
    """Decoder-only MoE LM.

    Args:
        spec: model shape (``ModelSpec``).
        moe: options of every MoE layer (``MoEConfig`` or dict); top_k/activation/n_shared_experts come from
            ``spec``.
        ep_size: expert-parallel group size of every MoE layer.
        stock_moe: build the MoE layers on stock ``deepspeed.moe.layer.MoE`` (capacity ``stock_capacity``,
            token dropping) instead of :class:`PiperMoE` — for the side-by-side benchmark.
        activation_checkpointing: recompute each block in backward (non-reentrant ``torch.utils.checkpoint``):
            only the block inputs stay alive between forward and backward. Recomputing an MoE block repeats its
            routing and its all-to-alls. May be switched later through the attribute of the same name.

    ``forward(ids [B, S] int64) -> (logits [B, S, V], aux_loss fp32 scalar)``; ``aux_loss`` already carries
    the coefficients: train on ``model.loss(logits, targets) + aux_loss``.
    """

    def __init__(self, spec: ModelSpec, moe: Union[MoEConfig, Dict[str, Any], None] = None, ep_size: int = 1,
                 stock_moe: bool = False, stock_capacity: float = 1.25, activation_checkpointing: bool = False):
        super().__init__()
        self.spec, self.ep_size, self.stock_moe = spec, ep_size, stock_moe
        self.activation_checkpointing = bool(activation_checkpointing)
        self.moe_config = merge_moe_with_model(spec, moe)
        if spec.num_experts % ep_size:
            raise ValueError(f"num_experts ({spec.num_experts}) must be divisible by ep_size ({ep_size})")
        self.embed = Embedding(spec.vocab_size, spec.d_model)
        self.blocks = nn.ModuleList([self._block(i, stock_capacity) for i in range(spec.n_layers)])
        self.head = Head(spec.vocab_size, spec.d_model, tied=self.embed if spec.tie_embeddings else None)

    def _block(self, index: int, stock_capacity: float) -> Block:
        s = self.spec
        attn = Attention(s.d_model, s.n_heads, s.kv_heads, s.hd, s.seq_len, kernels=self.moe_config.kernels)
        _init_linear(attn, std=0.02, out_proj=attn.o, n_layers=s.n_layers)
        if index < s.n_dense_layers:
            ffn = FeedForward(s.d_model, s.ffn_dense, s.activation, self.moe_config.kernels)
            _init_linear(ffn, std=0.02, out_proj=ffn.w2, n_layers=s.n_layers)
            return Block(attn, DenseFFN(ffn), s.d_model)
        if self.stock_moe:
            from piper_ds.models.stock import StockMoEFFN
            return Block(attn, StockMoEFFN(s, self.moe_config, self.ep_size, stock_capacity), s.d_model)
        moe = PiperMoE(s.d_model, s.num_experts, s.d_ffn_expert, ep_size=self.ep_size, config=self.moe_config)
        return Block(attn, PiperMoEFFN(moe), s.d_model)

    # ------------------------------------------------------------------------------------------ forward
    def layers(self) -> List[nn.Module]:
        """The flat layer sequence ``[embed, *blocks, head]``; each maps the previous layer's output onward."""
        return [self.embed, *self.blocks, self.head]

    def forward(self, ids_BS: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if ids_BS.shape[-1] > self.spec.seq_len:
            raise ValueError(f"input has {ids_BS.shape[-1]} tokens per sequence, more than seq_len "
                             f"({self.spec.seq_len})")
        out: Any = ids_BS
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers():
            if recompute and isinstance(layer, Block):
                out = checkpoint(layer, out, use_reentrant=False)
            else:
                out = layer(out)
        return out

    @staticmethod
    def loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats (fp32 scalar); targets already shifted by the caller."""
        return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))

    # ------------------------------------------------------------------------------------------ counts
    def moe_layers(self) -> List[nn.Module]:
        """The MoE modules (PiperMoE or stock MoE), in layer order."""
        from deepspeed.moe.layer import MoE
        return [m for m in self.modules() if isinstance(m, MoE)]

    def param_counts(self) -> Dict[str, int]:
        """Parameters actually held, by the planner's kinds (global counts: local experts x ep_size).

        Keys as in ``ModelSpec.param_counts()``: embedding, lm_head, attention, norms, dense_ffn, experts,
        shared, router, total.
        """
        c = dict.fromkeys(("embedding", "lm_head", "attention", "norms", "dense_ffn", "experts", "shared",
                           "router"), 0)
        for name, p in self.named_parameters():  # shared (tied) parameters are listed once
            kind = _kind_of(name)
            c[kind] += p.numel() * (self.ep_size if kind == "experts" else 1)
        c["total"] = sum(c.values())
        return c


def _kind_of(name: str) -> str:
    """The planner's kind of a parameter, from its name in :class:`MoETransformer`."""
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head.weight"):
        return "lm_head"
    if name.endswith("norm.weight"):
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".ffn.ffn." in name:
        return "dense_ffn"
    if "gate.wg" in name:
        return "router"
    if "shared_mlp" in name:
        return "shared"
    if ".experts." in name:
        return "experts"
    raise ValueError(f"parameter {name!r} has no kind in the planner's count")


@torch.no_grad()
def _init_linear(module: nn.Module, std: float, out_proj: Optional[nn.Linear], n_layers: int) -> None:
    """Normal(0, std) for every Linear in ``module``; residual-output projections get std / sqrt(2 L)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std / math.sqrt(2 * n_layers) if m is out_proj else std)


def build_model(spec: Union[ModelSpec, Dict[str, Any], str], moe: Union[MoEConfig, Dict[str, Any], None] = None,
                ep_size: int = 1, stock_moe: bool = False, seed: Optional[int] = None,
                activation_checkpointing: bool = False) -> MoETransformer:
    """A :class:`MoETransformer` from a spec, a ``"piper.model"`` block or a preset name.

    ``seed``: when given, seeds torch's global RNG first, so every rank builds identical dense weights and
    the same expert-init seed (experts then differ per EP rank by construction, as they must).
    """
    if isinstance(spec, str):
        spec = ModelSpec.preset(spec)
    elif not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_block(spec)
    if seed is not None:
        torch.manual_seed(seed)
    return MoETransformer(spec, moe, ep_size=ep_size, stock_moe=stock_moe,
                          activation_checkpointing=activation_checkpointing)
