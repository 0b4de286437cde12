"""The local experts of one rank as stacked weights, run with one grouped GEMM per matrix.

Parameters are stacked ``[E_local, ...]`` tensors (``w1``/``w3``: [E_local, D, F], ``w2``: [E_local, F, D]) so a
grouped GEMM (``torch._grouped_mm``) runs all local experts in one launch. For DeepSpeed they still look like
DeepSpeed-MoE experts: every parameter is tagged ``allreduce=False`` and ``group_name='ep_size_N'`` (ZeRO
shards them over the expert-data-parallel group) and the state dict is written per expert under
``deepspeed_experts.<local id>.<w>``, the keys DeepSpeed's MoE checkpointing splits into one file per expert.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from piper_ds.moe.config import MoEConfig

_WEIGHTS = ("w1", "w2", "w3")
_PER_EXPERT = "deepspeed_experts"


def grouped_mm(x_ND: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor,
               counts_list: Optional[List[int]] = None) -> torch.Tensor:
    """Rows of x grouped by expert (``counts_E`` rows each, in order) times that expert's matrix: [N, M].

    CUDA bf16 uses one ``torch._grouped_mm`` launch; elsewhere a loop of matmuls (exact, used by CPU tests).
    """
    if x_ND.is_cuda and x_ND.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        offs = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        return torch._grouped_mm(x_ND, w_EKM, offs=offs)
    counts_list = counts_E.tolist() if counts_list is None else counts_list
    # unbind, not w[e]: the backward of E selects would allocate E full-size zero gradients
    outs = [chunk @ w for chunk, w, n in zip(torch.split(x_ND, counts_list), w_EKM.unbind(0), counts_list) if n > 0]
    if not outs:  # no rows: still connect x and w, so every rank's gradient hooks fire (ZeRO counts on them)
        return x_ND.new_zeros(0, w_EKM.shape[-1]) + 0 * (w_EKM.sum() + x_ND.sum())
    return torch.cat(outs)


class GroupedExperts(nn.Module):
    """``num_local`` SwiGLU (or GELU) experts of hidden size ``d_ffn`` as stacked parameters."""

    def __init__(self, hidden_size: int, d_ffn: int, num_local: int, config: MoEConfig, group_name: str,
                 global_ids: List[int], init_seed: int, init_std: float = 0.02):
        super().__init__()
        self.num_local, self.hidden_size, self.d_ffn = num_local, hidden_size, d_ffn
        self.swiglu = config.activation == "swiglu"
        shapes = {"w1": (hidden_size, d_ffn), "w2": (d_ffn, hidden_size)}
        if self.swiglu:
            shapes["w3"] = (hidden_size, d_ffn)
        for name, shape in shapes.items():
            # Each expert draws from a generator seeded by (seed, global id, matrix): the same global weights
            # whatever the EP layout, and distinct experts on every EP rank.
            data = torch.stack([self._init(shape, init_seed, e, name, init_std) for e in global_ids]) if global_ids \
                else torch.empty((0, ) + shape)
            param = nn.Parameter(data)
            param.allreduce = False
            param.group_name = group_name
            self.register_parameter(name, param)
        self._register_state_dict_hook(_per_expert_state_dict)
        self._register_load_state_dict_pre_hook(_stack_per_expert_state_dict)

    @staticmethod
    def _init(shape, seed: int, expert: int, name: str, std: float) -> torch.Tensor:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + expert * 3 + _WEIGHTS.index(name)) % (2**63))
        return torch.randn(shape, generator=gen) * std

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        """x_ND: rows grouped by local expert slot, ``counts_L`` rows each. Returns [N, D] in x's dtype."""
        counts_list = None if x_ND.is_cuda else counts_L.tolist()
        w1, w2 = self.w1.to(x_ND.dtype), self.w2.to(x_ND.dtype)
        h = grouped_mm(x_ND, w1, counts_L, counts_list)
        if self.swiglu:
            h = nn.functional.silu(h) * grouped_mm(x_ND, self.w3.to(x_ND.dtype), counts_L, counts_list)
        else:
            h = nn.functional.gelu(h)
        return grouped_mm(h, w2, counts_L, counts_list)


def _per_expert_state_dict(module: GroupedExperts, state_dict, prefix: str, local_metadata) -> None:
    """Rewrites ``<prefix>w1`` [E_local, ...] into ``<prefix>deepspeed_experts.<i>.w1`` (DeepSpeed's layout)."""
    for name in _WEIGHTS:
        key = prefix + name
        if key in state_dict:
            stacked = state_dict.pop(key)
            for i in range(stacked.shape[0]):
                state_dict[f"{prefix}{_PER_EXPERT}.{i}.{name}"] = stacked[i]


def _stack_per_expert_state_dict(state_dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys,
                                 error_msgs) -> None:
    """Inverse of :func:`_per_expert_state_dict` at load time (also accepts the stacked form)."""
    for name in _WEIGHTS:
        keys = [f"{prefix}{_PER_EXPERT}.{i}.{name}" for i in range(_count_experts(state_dict, prefix, name))]
        if keys:
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


def _count_experts(state_dict, prefix: str, name: str) -> int:
    n = 0
    while f"{prefix}{_PER_EXPERT}.{n}.{name}" in state_dict:
        n += 1
    return n
