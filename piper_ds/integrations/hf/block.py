"""The module that takes a Hugging Face MoE block's place, and the load-balancing loss as transformers defines it.

transformers computes its MoE aux loss in the causal LM's forward from every layer's router logits together
(``load_balancing_loss_func``): with ``c_e`` the number of (token, layer) rows whose top-k (of a plain softmax
of the logits) holds expert e, ``p_e`` the sum of e's softmax probability over all rows and ``N`` the rows
(tokens not masked out by the attention mask, times layers),

    aux = E * sum_e (c_e / N) * (p_e / N)

The product is taken after summing over the layers, so it is not a sum of per-layer losses: each block adds its
``c`` and ``p`` to an :class:`AuxCollector` that the model's forward opens, and the model multiplies at the end.
A block run outside that forward adds nothing, as transformers' recorder, which only listens during the forward,
does. Activation checkpointing recomputes a block in backward, after the forward: the recomputation must save
the tensors the forward saved, so a block computes its statistics whenever the model's last forward asked for
them (the collector remembers it until the next forward), and only adds them inside that forward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from piper_ds.moe import PiperMoE
from piper_ds.moe.router import router_logits


def router_stats(x_TD: torch.Tensor, layer: PiperMoE,
                 token_mask_T: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's ``(c_E, p_E, N)`` for the rows ``x_TD`` [T, D] it routed, ``token_mask_T`` [T] (1 = counts) or
    None (all count); ``p_E`` is differentiable."""
    # the router's own logits function: the same fp32 logits the layer routed with
    probs_TE = router_logits(x_TD, layer.deepspeed_moe.gate.wg.weight).softmax(dim=-1)
    picked_TK = probs_TE.detach().topk(layer.config.top_k, dim=-1).indices
    weight_T = torch.ones(x_TD.shape[0], device=x_TD.device) if token_mask_T is None \
        else token_mask_T.to(device=x_TD.device, dtype=torch.float32)
    if weight_T.shape[0] != x_TD.shape[0]:
        raise ValueError(f"attention_mask covers {weight_T.shape[0]} tokens, the MoE block routed {x_TD.shape[0]}")
    counts_E = torch.zeros(probs_TE.shape[1], device=x_TD.device).scatter_add_(
        0, picked_TK.flatten(), weight_T.repeat_interleave(picked_TK.shape[1]))
    return counts_E, (probs_TE * weight_T[:, None]).sum(dim=0), weight_T.sum()


class RouterStats:
    """The sums ``c_E``, ``p_E``, ``N`` of the load-balancing loss above over the blocks of one forward."""

    def __init__(self):
        self.counts_E: Optional[torch.Tensor] = None
        self.probs_E: Optional[torch.Tensor] = None
        self.rows: Optional[torch.Tensor] = None

    def add(self, counts_E: torch.Tensor, probs_E: torch.Tensor, rows: torch.Tensor) -> None:
        if self.counts_E is None:
            self.counts_E, self.probs_E, self.rows = counts_E, probs_E, rows
        else:
            self.counts_E, self.probs_E, self.rows = self.counts_E + counts_E, self.probs_E + probs_E, self.rows + rows

    def load_balancing_loss(self) -> Optional[torch.Tensor]:
        """``E * sum_e (c_e / N) * (p_e / N)`` (fp32 scalar, not multiplied by its coefficient); None when no
        block added statistics."""
        if self.counts_E is None:
            return None
        return self.counts_E.numel() * torch.sum((self.counts_E / self.rows) * (self.probs_E / self.rows))


class AuxCollector:
    """Shared by the converted blocks of one model. ``wanted`` and ``token_mask_T`` are the last forward's
    (whether it asks for the load-balancing loss, and its flattened attention mask); ``active`` is the
    :class:`RouterStats` of the forward running now, None outside one."""

    def __init__(self):
        self.wanted = False
        self.token_mask_T: Optional[torch.Tensor] = None
        self.active: Optional[RouterStats] = None

    @contextlib.contextmanager
    def forward(self, wanted: bool, token_mask_T: Optional[torch.Tensor]) -> Iterator[RouterStats]:
        """Opens one forward of the model (not re-entrant)."""
        if self.active is not None:
            raise RuntimeError("AuxCollector.forward is already open: a forward of the model inside its own forward")
        self.wanted, self.token_mask_T, self.active = wanted, token_mask_T, RouterStats()
        try:
            yield self.active
        finally:
            self.active = None


class HFMoEBlock(nn.Module):
    """Stands where a Hugging Face MoE block stood (``decoder_layer.mlp``): ``forward(hidden [..., D]) -> [..., D]``
    through the :class:`PiperMoE` ``moe``, which holds the router, this rank's experts and the shared experts.
    The layer's own ``l_aux`` is zero (a converted model's layers have no PiperMoE aux or z-loss)."""

    def __init__(self, moe: PiperMoE, collector: AuxCollector):
        super().__init__()
        self.moe = moe
        self.collector = collector  # a plain object shared by the blocks, not a submodule

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y, _, _ = self.moe(hidden_states)
        collector = self.collector
        if collector.wanted:  # also in a recomputation: it must save what the forward saved
            stats = router_stats(hidden_states.reshape(-1, hidden_states.shape[-1]), self.moe, collector.token_mask_T)
            if collector.active is not None:
                collector.active.add(*stats)
        return y
