"""The local experts of one rank as stacked weights, run by :func:`piper_ds.ops.experts.fanned_grouped_mlp`.

Parameters: ``w_up`` [E_local, D, W] and ``w_down`` [E_local, F, D]. For SwiGLU experts W = 2F and ``w_up`` holds
each expert's gate (``w1``) and up (``w3``) projections side by side, ``[..., :F]`` and ``[..., F:]``, so both run
as one grouped GEMM; for GELU experts W = F and ``w_up`` is ``w1``. ``w1``, ``w2`` and ``w3`` are read-only views.

For DeepSpeed they still look like DeepSpeed-MoE experts: every parameter is tagged ``allreduce=False`` and
``group_name='ep_size_N'`` (ZeRO shards them over the expert-data-parallel group) and the state dict is written
per expert under ``deepspeed_experts.<local id>.w1`` / ``w2`` / ``w3``, the keys DeepSpeed's MoE checkpointing
splits into one file per expert (and loads back, stacked and joined again).

Weights are drawn per expert and matrix from a CPU generator seeded by (seed, global expert id, matrix), so an
expert has the same weights under any EP layout. :func:`weight_draw` replaces that draw inside a ``with``
block (a benchmark that only needs normal weights draws them on the device instead).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from piper_ds.moe.config import MoEConfig
from piper_ds.ops.experts import fanned_grouped_mlp

_WEIGHTS = ("w1", "w2", "w3")
#: The state-dict name of the per-expert ModuleList DeepSpeed splits into one checkpoint file per expert.
PER_EXPERT = "deepspeed_experts"

#: Standard deviation of the expert weights when drawn (the reference model's linear layers use the same).
INIT_STD = 0.02

#: ``draw(shape, seed, expert, name) -> tensor`` of one expert matrix; see :func:`weight_draw`.
Draw = Callable[[Tuple[int, ...], int, int, str], torch.Tensor]
_DRAW: contextvars.ContextVar[Optional[Draw]] = contextvars.ContextVar("piper_expert_weight_draw", default=None)


@contextlib.contextmanager
def weight_draw(draw: Draw) -> Iterator[None]:
    """Inside the block every :class:`GroupedExperts` draws its matrices with ``draw(shape, seed, expert, name)``
    (``name`` one of w1, w2, w3) instead of the seeded CPU draw."""
    token = _DRAW.set(draw)
    try:
        yield
    finally:
        _DRAW.reset(token)


def seeded_draw(shape: Tuple[int, ...], seed: int, expert: int, name: str) -> torch.Tensor:
    """The default draw: normal(0, :data:`INIT_STD`) from a CPU generator seeded by (seed, expert, matrix)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + expert * 3 + _WEIGHTS.index(name)) % (2**63))
    return torch.randn(shape, generator=gen) * INIT_STD


class GroupedExperts(nn.Module):
    """``num_local`` SwiGLU (or GELU) experts of hidden size ``d_ffn`` as stacked parameters."""

    def __init__(self, hidden_size: int, d_ffn: int, num_local: int, config: MoEConfig, group_name: str,
                 global_ids: List[int], init_seed: int):
        super().__init__()
        self.num_local, self.hidden_size, self.d_ffn = num_local, hidden_size, d_ffn
        self.activation = config.activation
        self.backend = config.kernels  # auto | cuda | reference: the ops take the same names
        width = 2 * d_ffn if self.swiglu else d_ffn
        for name, shape in (("w_up", (num_local, hidden_size, width)), ("w_down", (num_local, d_ffn, hidden_size))):
            param = nn.Parameter(torch.empty(shape))
            param.allreduce = False
            param.group_name = group_name
            self.register_parameter(name, param)
        self.init_experts(global_ids, init_seed)
        self._register_state_dict_hook(_per_expert_state_dict)
        self._register_load_state_dict_pre_hook(_stack_per_expert_state_dict)

    @property
    def swiglu(self) -> bool:
        return self.activation == "swiglu"

    @torch.no_grad()
    def init_experts(self, global_ids: List[int], seed: int) -> None:
        """Draws the weights of experts ``global_ids`` (in slot order) into this module's parameters, each
        matrix by :func:`seeded_draw` (or the draw :func:`weight_draw` set): the same global weights whatever
        the EP layout, and distinct experts on every EP rank."""
        if len(global_ids) != self.num_local:
            raise ValueError(f"init_experts: {len(global_ids)} expert ids for {self.num_local} local slots")
        draw = _DRAW.get() or seeded_draw
        D, F = self.hidden_size, self.d_ffn
        for slot, e in enumerate(global_ids):
            up = [draw((D, F), seed, e, "w1")] + ([draw((D, F), seed, e, "w3")] if self.swiglu else [])
            self.w_up[slot].copy_(torch.cat(up, dim=1))
            self.w_down[slot].copy_(draw((F, D), seed, e, "w2"))

    @torch.no_grad()
    def load_expert(self, slot: int, weights: Dict[str, torch.Tensor]) -> None:
        """Copies one expert's matrices into ``slot``: ``weights`` maps w1 [D, F], w2 [F, D] and (SwiGLU) w3
        [D, F], the names of the per-expert state dict. ValueError naming the matrix on a missing name or a
        shape mismatch."""
        if not 0 <= slot < self.num_local:
            raise ValueError(f"slot {slot} out of range [0, {self.num_local})")
        D, F = self.hidden_size, self.d_ffn
        want = {"w1": (D, F), "w2": (F, D), **({"w3": (D, F)} if self.swiglu else {})}
        if set(weights) != set(want):
            raise ValueError(f"expert weights {sorted(weights)} do not match this {self.activation} expert's "
                             f"{sorted(want)}")
        for name, shape in want.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"expert matrix {name} has shape {tuple(weights[name].shape)}, the layer's experts "
                                 f"need {shape}")
        self.w_up[slot, :, :F].copy_(weights["w1"])
        if self.swiglu:
            self.w_up[slot, :, F:].copy_(weights["w3"])
        self.w_down[slot].copy_(weights["w2"])

    @property
    def w1(self) -> torch.Tensor:
        """[E_local, D, F] gate (SwiGLU) or up (GELU) projections: a view of ``w_up``."""
        return self.w_up[..., :self.d_ffn]

    @property
    def w3(self) -> Optional[torch.Tensor]:
        """[E_local, D, F] up projections of SwiGLU experts (a view of ``w_up``); None for GELU experts."""
        return self.w_up[..., self.d_ffn:] if self.swiglu else None

    @property
    def w2(self) -> torch.Tensor:
        """[E_local, F, D] down projections (``w_down``)."""
        return self.w_down

    def forward(self, x_RD: torch.Tensor, pos_RK: torch.Tensor, num_rows: int, counts_L: torch.Tensor,
                offsets_L: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The experts of the rows ``expand_rows(x_RD, pos_RK, num_rows)`` (:mod:`piper_ds.ops.permute`; row r
        of x_RD copied to rows pos[r, k]), grouped by local expert slot, ``counts_L`` rows each (``offsets_L``:
        their int32 cumsum, when the plan has it). Rows past the counts are ignored. Returns [num_rows, D] in
        x's dtype. Taking the rows before the fan lets backward keep x_RD rather than the expanded rows."""
        return fanned_grouped_mlp(x_RD, pos_RK, num_rows, self.w_up, self.w_down, counts_L, offsets_L,
                                  self.activation, self.backend)

    def extra_repr(self) -> str:
        return f"experts={self.num_local}, hidden={self.hidden_size}, d_ffn={self.d_ffn}, {self.activation}"


def _per_expert_state_dict(module: GroupedExperts, state_dict, prefix: str, local_metadata) -> None:
    """Rewrites ``w_up`` / ``w_down`` [E_local, ...] into ``<prefix>deepspeed_experts.<i>.w1/w2/w3`` (views)."""
    up, down = state_dict.pop(prefix + "w_up", None), state_dict.pop(prefix + "w_down", None)
    if up is None or down is None:
        return
    F = module.d_ffn
    for i in range(up.shape[0]):
        state_dict[f"{prefix}{PER_EXPERT}.{i}.w1"] = up[i, :, :F]
        if module.swiglu:
            state_dict[f"{prefix}{PER_EXPERT}.{i}.w3"] = up[i, :, F:]
        state_dict[f"{prefix}{PER_EXPERT}.{i}.w2"] = down[i]


def _stack_per_expert_state_dict(state_dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys,
                                 error_msgs) -> None:
    """Inverse of :func:`_per_expert_state_dict` at load time (also accepts the stacked ``w_up``/``w_down``)."""
    stacked = {}
    for name in _WEIGHTS:
        keys = [f"{prefix}{PER_EXPERT}.{i}.{name}" for i in range(_count_experts(state_dict, prefix, name))]
        if keys:
            stacked[name] = torch.stack([state_dict.pop(k) for k in keys])
    if "w1" in stacked:
        state_dict[prefix + "w_up"] = torch.cat([stacked["w1"], stacked["w3"]], dim=2) if "w3" in stacked \
            else stacked["w1"]
    if "w2" in stacked:
        state_dict[prefix + "w_down"] = stacked["w2"]


def _count_experts(state_dict, prefix: str, name: str) -> int:
    n = 0
    while f"{prefix}{PER_EXPERT}.{n}.{name}" in state_dict:
        n += 1
    return n
