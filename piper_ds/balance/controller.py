"""The balance controller: every ``window`` applied optimizer steps, measure, report, plan and migrate.

The engines call :meth:`BalanceController.after_applied_step` after each applied optimizer step, after the
routers' selection-bias update (``PiperEngine.step``, ``PiperPipelineEngine._exec_optimizer_step``). At the end
of a window, on every rank that holds the layers (a collective over them):

1. the window's tokens per expert are summed over the layers' replicas (:func:`piper_ds.balance.load.reduce_window`);
2. per layer, the max/mean EP-rank load under the current placement;
3. with ``migration`` on, a plan per layer (:func:`piper_ds.balance.planner.plan_layer`) and, when any layer has
   swaps, one call of ``piper_ds.balance.mover.migrate_experts(engine, moves)``, with the same moves on every
   rank of the stage, right after the optimizer step (no gradient is held then);
4. the metrics go through ``engine.monitor`` (rank 0 writes; under pp > 1 the stages' figures are gathered
   over each pipeline first), labelled ``Train/Samples/balance/...`` at the samples seen:
   ``rank_load_max_over_mean/layer_<i>`` (layers numbered over the whole pipeline), ``rank_load_max_over_mean_avg``
   (their mean), and with migration on ``planned_max_over_mean_avg`` (predicted after the swaps), ``moves``
   (swaps made), ``bytes_moved`` (sent by all ranks) and ``migration_s`` (the slowest rank's time).

Every rank computes the same plan: the loads are integers summed by one all-reduce, the step time travels in it,
and the planner breaks ties by rank and expert id. Applied steps are the same on every rank (DeepSpeed reduces
the overflow check over the whole job), so every stage reaches a window's end at the same step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from piper_ds.balance.load import rank_load_ratios, reduce_window
from piper_ds.balance.mover import migrate_experts
from piper_ds.balance.planner import LayerPlan, plan_layer
from piper_ds.system.migration import expert_migration_bytes
from piper_ds.tracking.monitor import write_scalars

PREFIX = "balance/"


@dataclass(frozen=True)
class WindowReport:
    """One window as this rank saw it. ``ratios``/``plans``: this stage's layers (``plans`` empty with migration
    off); ``moves``, ``bytes_sent`` (summed over the stage's ranks) and ``seconds`` (slowest rank) of the
    migration, 0 without one; ``metrics``: what went to the monitor, for the whole pipeline."""

    step: int
    step_seconds: float
    ratios: Tuple[float, ...]
    plans: Tuple[LayerPlan, ...]
    moves: int
    bytes_sent: int
    seconds: float
    metrics: Dict[str, float] = field(default_factory=dict)


class BalanceController:
    """Windowed load monitoring and expert migration for the PiperMoE ``layers`` of one rank.

    Args:
        config: the ``"piper.balance"`` block (:class:`piper_ds.config.BalanceConfig`).
        layers: the engine's ``piper_moe_layers`` (the mover's moves are indexed in this order).
        counter: the engine's :class:`~piper_ds.tracking.expert_load.ExpertLoadCounter` (it hooks the layers).
        bytes_per_expert: per layer, what one rank sends per migrated expert (:func:`expert_bytes`).
        reduce_group: the ranks holding the same layers (None: the world, pp = 1; the stage's data-parallel
            group at pp > 1).
        pipe_group: at pp > 1, this rank's pipeline (the stages' figures are gathered over it); None at pp = 1.
        device: where the counts are summed (the engine's device).

    Raises ValueError, at engine setup, when migration is on but a layer has ep_size 1 or there is no layer.
    """

    def __init__(self, config, layers: Sequence, counter, bytes_per_expert: Sequence[int], reduce_group=None,
                 pipe_group=None, device=None):
        if len(bytes_per_expert) != len(layers):
            raise ValueError(f"{len(bytes_per_expert)} expert sizes for {len(layers)} layers")
        if config.migration:
            _check_migratable(layers, pipeline=pipe_group is not None)
        self.config, self.layers, self.counter = config, list(layers), counter
        self.indices = [counter.index_of(layer) for layer in self.layers]
        self.bytes_per_expert = [int(b) for b in bytes_per_expert]
        self.reduce_group, self.pipe_group, self.device = reduce_group, pipe_group, device
        # pp = 1 without PiperMoE: nothing to do anywhere. pp > 1: every stage joins the gather, layers or not.
        self.enabled = bool(self.layers) or pipe_group is not None
        self.applied_steps = 0
        self.reports: List[WindowReport] = []
        self._clock = time.perf_counter()

    @classmethod
    def for_engine(cls, engine, config, reduce_group=None, pipe_group=None) -> "BalanceController":
        """The controller of a PiperEngine (``reduce_group``, ``pipe_group`` None) or of a pipeline engine (its
        grid's data-parallel and pipe-parallel groups) built for ``engine.piper_moe_layers``."""
        layers = engine.piper_moe_layers
        return cls(config, layers, engine.expert_load, [expert_bytes(engine, layer) for layer in layers],
                   reduce_group=reduce_group, pipe_group=pipe_group, device=engine.device)

    def after_optimizer_step(self, engine, applied: bool) -> Optional[WindowReport]:
        """What the engines run after every optimizer step: when it was ``applied``, every PiperMoE updates its
        selection bias (aux-loss-free balancing), then :meth:`after_applied_step` counts the step."""
        if not applied:
            return None
        for layer in self.layers:
            layer.update_selection_bias()
        return self.after_applied_step(engine)

    def after_applied_step(self, engine) -> Optional[WindowReport]:
        """Counts an applied optimizer step; at the end of a window runs steps 1-4 of the module docstring and
        returns the :class:`WindowReport` (also kept in :attr:`reports`), else None. A collective at a
        window's end."""
        if not self.enabled:
            return None
        self.applied_steps += 1
        if self.applied_steps % self.config.window:
            return None
        seconds = time.perf_counter() - self._clock
        window = self._measure(seconds)
        ratios = rank_load_ratios(window.expert_loads, [layer.placement.rank_of.tolist() for layer in self.layers],
                                  [layer.ep_size for layer in self.layers])
        plans = self._plan(window) if self.config.migration else ()
        moves = {i: list(p.swaps) for i, p in enumerate(plans) if p.swaps}
        sent, secs = self._migrate(engine, moves) if moves else (0, 0.0)
        metrics = self._metrics(ratios, plans, sum(len(m) for m in moves.values()), sent, secs)
        write_scalars(engine.monitor, metrics, engine.global_samples, prefix="Train/Samples/")
        report = WindowReport(self.applied_steps, window.step_seconds, ratios, tuple(plans),
                              sum(len(m) for m in moves.values()), sent, secs, metrics)
        self.reports.append(report)
        self._clock = time.perf_counter()  # the migration and the reduction stay out of the next window's time
        return report

    def _measure(self, seconds: float):
        counts = self.counter.take_window_counts()
        return reduce_window([counts[i] for i in self.indices], [layer.num_experts for layer in self.layers],
                             seconds, self.config.window, self.reduce_group, self.device)

    def _plan(self, window) -> List[LayerPlan]:
        """One plan per layer; the stage's MoE time (``moe_time_fraction`` of the step) split evenly over them."""
        cfg = self.config
        layer_s = cfg.moe_time_fraction * window.step_seconds / max(len(self.layers), 1)
        return [plan_layer(loads, layer.placement.rank_of.tolist(), layer.ep_size, max_swaps=cfg.max_moves_per_layer,
                           threshold=cfg.threshold, layer_seconds=layer_s, window=cfg.window,
                           bytes_per_expert=nbytes, p2p_gbps=cfg.p2p_gbps)
                for loads, layer, nbytes in zip(window.expert_loads, self.layers, self.bytes_per_expert)]

    def _migrate(self, engine, moves: Dict[int, List[Tuple[int, int]]]) -> Tuple[int, float]:
        """Runs the mover; (bytes sent by the stage's ranks, the slowest rank's seconds)."""
        report = migrate_experts(engine, moves)
        sent = torch.tensor([int(report.bytes_sent)], dtype=torch.int64, device=self.device)
        secs = torch.tensor([float(report.seconds)], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size(self.reduce_group) > 1:
            dist.all_reduce(sent, group=self.reduce_group)
            dist.all_reduce(secs, op=dist.ReduceOp.MAX, group=self.reduce_group)
        return int(sent.item()), float(secs.item())

    def _metrics(self, ratios: Sequence[float], plans: Sequence[LayerPlan], moves: int, sent: int,
                 secs: float) -> Dict[str, float]:
        """The window's metrics for the whole pipeline (gathered over ``pipe_group`` at pp > 1)."""
        stage = (list(ratios), [p.ratio_after for p in plans], moves, sent, secs)
        stages = [stage]
        if self.pipe_group is not None and dist.get_world_size(self.pipe_group) > 1:
            stages = [None] * dist.get_world_size(self.pipe_group)
            dist.all_gather_object(stages, stage, group=self.pipe_group)
        all_ratios = [r for s in stages for r in s[0]]
        planned = [r for s in stages for r in s[1]]
        out = {f"{PREFIX}rank_load_max_over_mean/layer_{i}": r for i, r in enumerate(all_ratios)}
        if all_ratios:
            out[f"{PREFIX}rank_load_max_over_mean_avg"] = sum(all_ratios) / len(all_ratios)
        if self.config.migration:
            if planned:
                out[f"{PREFIX}planned_max_over_mean_avg"] = sum(planned) / len(planned)
            out[f"{PREFIX}moves"] = float(sum(s[2] for s in stages))
            out[f"{PREFIX}bytes_moved"] = float(sum(s[3] for s in stages))
            out[f"{PREFIX}migration_s"] = max(s[4] for s in stages)
        return out


def _check_migratable(layers: Sequence, pipeline: bool) -> None:
    """ValueError naming the layers unless every PiperMoE layer has ep_size > 1 and there is one. Under pp > 1
    a stage sees only its own layers, so the stages agree first (one all-reduce over the world: every rank
    raises, none waits for a rank that did)."""
    ep_sizes = [layer.ep_size for layer in layers]
    single = [i for i, ep in enumerate(ep_sizes) if ep == 1]
    found, bad = len(layers), len(single)
    if pipeline and dist.is_initialized() and dist.get_world_size() > 1:
        from deepspeed.accelerator import get_accelerator
        both = torch.tensor([found, bad], dtype=torch.int64, device=get_accelerator().current_device_name())
        dist.all_reduce(both)
        found, bad = (int(v) for v in both.tolist())
    if bad:
        raise ValueError(f"piper.balance.migration is on but {bad} PiperMoE layer(s) have ep_size 1 (this rank's "
                         f"layers {single} of ep_sizes {ep_sizes}): experts can only move between EP ranks; set "
                         "piper.parallel.ep_size > 1 or turn migration off")
    if not found:
        raise ValueError("piper.balance.migration is on but the model has no PiperMoE layer to migrate")


def expert_bytes(engine, layer) -> int:
    """Bytes one rank sends per migrated expert of ``layer`` right after an optimizer step (no gradient): the fp32
    master copy (16-bit training or ZeRO >= 1; the receiver casts the weights from it) or else the weights as
    the layer holds them, and the Adam moments (:func:`piper_ds.system.migration.expert_migration_bytes`)."""
    params = list(layer.deepspeed_moe.experts.parameters())
    per_expert = sum(p.numel() for p in params) // layer.num_local_experts
    master = engine.zero_optimization_stage() >= 1 or engine.bfloat16_enabled() or engine.fp16_enabled()
    return expert_migration_bytes(per_expert, weight_bytes=params[0].element_size(), master_copy=master,
                                  with_grads=False, weights_from_master=True)
