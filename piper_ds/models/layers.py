"""Building blocks of the reference MoE transformer: RMSNorm, rotary embedding, attention, FFN sub-layers.

Shapes: B batch, S sequence, D model dim, H query heads, G key/value heads, Dh head dim, V vocabulary.
No biases anywhere (the planner's parameter count relies on it).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from piper_ds.ops.rope import rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain of size D (no bias); torch's fused ``rms_norm`` (fp32
    statistics) in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x_BSD, (x_BSD.shape[-1], ), self.weight.to(x_BSD.dtype), self.eps)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) over the full head dim. The cos/sin tables, fp32
    [max_seq, head_dim / 2], are made once per device on first use and are not module state: neither saved in
    checkpoints (they are a function of ``head_dim``, ``max_seq`` and ``base``) nor rounded when the model is cast.

    ``kernels`` ("auto" | "cuda" | "cpu" | "reference"): the backend of :func:`piper_ds.ops.rotary` (one pass
    each way, in the input's memory layout, fp32 math), or its PyTorch reference.
    """

    def __init__(self, head_dim: int, max_seq: int, base: float = 10000.0, kernels: str = "auto"):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim, self.max_seq, self.base, self.kernels = head_dim, max_seq, base, kernels
        self._tables: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def angle_tables(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of position * frequency on ``device``, fp32 [max_seq, head_dim / 2]."""
        if device not in self._tables:
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
            angles = torch.outer(torch.arange(self.max_seq, dtype=torch.float32), inv_freq)
            self._tables[device] = (angles.cos().to(device), angles.sin().to(device))
        return self._tables[device]

    def forward(self, x_BHSD: torch.Tensor) -> torch.Tensor:
        S = x_BHSD.shape[-2]
        if S > self.max_seq:
            raise ValueError(f"sequence length {S} exceeds the rotary table's max_seq ({self.max_seq})")
        return rotary(x_BHSD, *self.angle_tables(x_BHSD.device), self.kernels)


class Attention(nn.Module):
    """Causal self-attention through ``scaled_dot_product_attention``; grouped-query when n_kv_heads < n_heads.

    Parameters: q D*(H*Dh), k and v D*(G*Dh) each, o (H*Dh)*D.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, max_seq: int,
                 rope_base: float = 10000.0, kernels: str = "auto"):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.rotary = Rotary(head_dim, max_seq, rope_base, kernels)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q), self.rotary(k)
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # [B, H, S, Dh]
        return self.o(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class DenseFFN(nn.Module):
    """A dense FFN sub-layer with the MoE sub-layer's interface: ``forward(x) -> (y, aux=0)``."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn

    def forward(self, x_BSD: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.ffn(x_BSD), None


class PiperMoEFFN(nn.Module):
    """Wraps a :class:`piper_ds.moe.PiperMoE` as an FFN sub-layer: ``forward(x) -> (y, l_aux)``.

    The attribute is named ``moe`` on purpose: DeepSpeed's MoE checkpoint code treats every state-dict key
    under an MoE module that contains "expert" as an expert weight.
    """

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x_BSD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y, l_aux, _ = self.moe(x_BSD)
        return y, l_aux


class Block(nn.Module):
    """Pre-norm transformer block: ``h + attn(norm(h))``, then ``h + ffn(norm(h))``.

    ``forward((h [B,S,D], aux fp32 scalar)) -> (h, aux + this layer's aux loss)``: the aux loss travels with
    the activations so a pipeline stage boundary can cut between any two blocks.
    """

    def __init__(self, attention: Attention, ffn: nn.Module, d_model: int, norm_eps: float = 1e-6):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = attention
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = ffn

    def forward(self, inputs: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        h, aux = inputs
        h = h + self.attn(self.attn_norm(h))
        y, l_aux = self.ffn(self.ffn_norm(h))
        h = h + y
        if l_aux is not None:
            aux = aux + l_aux.float()
        return h, aux


class Embedding(nn.Module):
    """Token embedding, the first layer: ``ids [B,S] int64 -> (h [B,S,D], aux = 0.0 fp32)``."""

    def __init__(self, vocab_size: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * init_std)

    def forward(self, ids_BS: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = F.embedding(ids_BS, self.weight)
        return h, torch.zeros((), dtype=torch.float32, device=h.device)


class Head(nn.Module):
    """Final RMSNorm and LM head, the last layer: ``(h, aux) -> (logits [B,S,V], aux)``.

    With ``tied`` set to the :class:`Embedding`, the head reuses its table (no parameter of its own).
    """

    def __init__(self, vocab_size: int, d_model: int, norm_eps: float = 1e-6, tied: Optional[Embedding] = None,
                 init_std: float = 0.02):
        super().__init__()
        self.norm = RMSNorm(d_model, norm_eps)
        self.tied = tied is not None
        if tied is not None:
            self.weight = tied.weight  # the same Parameter: counted and optimised once
        else:
            self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * init_std)

    def forward(self, inputs: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        h, aux = inputs
        return F.linear(self.norm(h), self.weight.to(h.dtype)), aux
