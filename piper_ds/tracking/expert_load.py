"""Expert load and router losses per MoE layer: counted by forward hooks, summed over ranks on demand.

Counts are *assignments asked for* (a token routed to k experts counts k times), before capacity dropping.
PiperMoE layers report how many assignments they dropped; for stock DeepSpeed MoE layers it is derived from
their capacity rule (each expert keeps at most ``max(ceil(T / E * capacity_factor * k), min_capacity)``).
PiperMoE layers also report their aux and z losses (coefficients applied), so the losses are known where the
training loss holds them only summed, as under pipeline parallelism.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from deepspeed.moe.layer import MoE
from torch import nn


class ExpertLoadCounter:
    """Accumulates, for every MoE layer of ``model`` in module order, the tokens sent to each expert (int64
    [E]) and the dropped / total assignments, over training-mode forwards since the last :meth:`collect`.

    The same hook also fills a second, independent tally of tokens per expert, read and reset by
    :meth:`take_window_counts` only: the balance window (:mod:`piper_ds.balance`) spans its own number of
    steps, whatever interval the metrics are collected at."""

    def __init__(self, model: nn.Module):
        self.layers: List[Tuple[str, nn.Module]] = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
        self._reset()
        self.window_counts: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

        self._reset_losses()

    def _reset(self) -> None:
        self.counts: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.dropped: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.assigned = [0] * len(self.layers)

    def _reset_losses(self) -> None:
        self.loss_sums: List[Optional[torch.Tensor]] = [None] * len(self.layers)  # (aux, z) summed over forwards
        self.forwards = [0] * len(self.layers)

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs, output) -> None:
            if not module.training:
                return
            stats = getattr(module, "last_stats", None)
            if stats:  # PiperMoE: "assignments" is a CPU tensor, "dropped" lives with the counts
                counts = stats["tokens_per_expert"].detach().long()
                self._add(index, counts, stats["dropped"].detach().long(), int(stats["assignments"]))
                self._add_losses(index, torch.stack([stats["aux_loss"], stats["z_loss"]]).float())
            else:  # stock MoE: counts before capacity; it keeps at most `capacity` per expert
                counts = output[2].detach().long()
                tokens = inputs[0].numel() // inputs[0].shape[-1]
                self._add(index, counts, _stock_dropped(module, counts, tokens), tokens * module.deepspeed_moe.gate.k)
        return hook

    @torch.no_grad()
    def _add(self, i: int, counts: torch.Tensor, dropped: torch.Tensor, assigned: int) -> None:
        if self.counts[i] is None:
            self.counts[i] = counts.clone()
        else:
            self.counts[i] += counts
        if self.window_counts[i] is None:
            self.window_counts[i] = counts.clone()
        else:
            self.window_counts[i] += counts
        self.dropped[i] = dropped.clone() if self.dropped[i] is None else self.dropped[i] + dropped
        self.assigned[i] += assigned

    @torch.no_grad()
    def _add_losses(self, i: int, aux_z: torch.Tensor) -> None:
        self.loss_sums[i] = aux_z.clone() if self.loss_sums[i] is None else self.loss_sums[i] + aux_z
        self.forwards[i] += 1

    @torch.no_grad()
    def take_router_losses(self, device) -> Optional[torch.Tensor]:
        """This rank's router losses per micro-batch since the last call, fp32 [2] on ``device``: (aux, z), each
        the sum over its layers of the layer's mean over forwards (the halves of the overlap schedule and
        recomputed forwards included, so a micro-batch counts once); then a reset. None when no layer
        reported losses (no PiperMoE layer, or no training forward)."""
        means = [s.to(device) / n for s, n in zip(self.loss_sums, self.forwards) if s is not None]
        self._reset_losses()
        return torch.stack(means).sum(dim=0) if means else None

    def index_of(self, layer: nn.Module) -> int:
        """Position of ``layer`` among :attr:`layers` (module order); ValueError if the counter does not hook it."""
        for i, (_, m) in enumerate(self.layers):
            if m is layer:
                return i
        raise ValueError(f"{type(layer).__name__} is not one of the {len(self.layers)} MoE layers this counter hooks")

    @torch.no_grad()
    def take_window_counts(self) -> List[Optional[torch.Tensor]]:
        """This rank's tokens per expert of each layer (int64 [E], on the layer's device; None for a layer without
        a training forward) since the last call, and a reset of this tally only (:meth:`collect` keeps its own).
        Local: the caller sums over the ranks it needs."""
        out, self.window_counts = self.window_counts, [None] * len(self.layers)
        return out

    @torch.no_grad()
    def collect(self, group=None) -> Tuple[Optional[torch.Tensor], float, float]:
        """(counts [L, E] int64 on CPU, dropped, assigned), summed over ``group``, and a reset; a collective:
        every rank of ``group`` must call it. counts is None when the model has no MoE layer."""
        if not self.layers:
            return None, 0.0, 0.0
        device = next((c.device for c in self.counts if c is not None), None)
        if device is None:
            device = next(self.layers[0][1].parameters()).device
        rows = [c if c is not None else torch.zeros(m.num_experts, dtype=torch.long, device=device)
                for c, (_, m) in zip(self.counts, self.layers)]
        widths = {r.numel() for r in rows}
        if len(widths) > 1:  # layers with different expert counts: pad to the widest
            width = max(widths)
            rows = [torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows]
        dropped = torch.stack([d.to(device) if d is not None else torch.zeros((), dtype=torch.long, device=device)
                               for d in self.dropped]).sum().reshape(1)
        flat = torch.cat([torch.stack(rows).flatten(), dropped,
                          torch.tensor([sum(self.assigned)], dtype=torch.long, device=device)])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(flat, group=group)
        flat = flat.cpu()
        self._reset()
        counts = flat[:-2].view(len(rows), -1)
        dropped, assigned = flat[-2:].tolist()
        return counts, float(dropped), float(assigned)

    @staticmethod
    def summary(counts_LE: Optional[torch.Tensor], dropped: float, assigned: float) -> Dict[str, float]:
        """``load_max_over_mean``: the worst layer's (busiest expert / mean expert) load, 1.0 = balanced;
        ``load_max_over_mean_avg``: its mean over layers; ``dropped_pct``: dropped assignments in % (NaN if
        no assignment counted). Empty dict without MoE layers or counted tokens."""
        if counts_LE is None or counts_LE.sum() == 0:
            return {}
        c = counts_LE.double()
        mean = c.mean(dim=1).clamp_min(1e-12)
        ratio = c.max(dim=1).values / mean
        ratio = ratio[c.sum(dim=1) > 0]
        return {"load_max_over_mean": float(ratio.max()), "load_max_over_mean_avg": float(ratio.mean()),
                "dropped_pct": math.nan if assigned == 0 else 100.0 * dropped / assigned}

    def remove(self) -> None:
        """Removes the forward hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []


def _stock_dropped(module: nn.Module, counts_E: torch.Tensor, tokens: int) -> torch.Tensor:
    """Assignments a stock ``deepspeed.moe`` layer dropped on this rank: counts above its capacity (training)."""
    gate = module.deepspeed_moe.gate
    if not gate.drop_tokens:
        return torch.zeros((), dtype=torch.long, device=counts_E.device)
    capacity = max(math.ceil(tokens / counts_E.numel() * gate.capacity_factor * gate.k), gate.min_capacity)
    return (counts_E - capacity).clamp_min(0).sum()


@torch.no_grad()
def mean_router_losses(counter: ExpertLoadCounter, device, replicas: int) -> Dict[str, float]:
    """``{"aux_loss", "z_loss"}``: the router losses of a training micro-batch since the last call, summed over
    the ranks of the job and divided by ``replicas`` (the copies of the model: the data-parallel degree; each
    pipeline stage holds only its own layers). A collective over the world; {} when no rank has PiperMoE
    losses."""
    local = counter.take_router_losses(device)
    flat = torch.zeros(3, dtype=torch.float64, device=device)
    if local is not None:
        flat[:2], flat[2] = local.double(), 1.0
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flat)
    if flat[2] == 0:
        return {}
    aux, z = (flat[:2] / replicas).tolist()
    return {"aux_loss": aux, "z_loss": z}
