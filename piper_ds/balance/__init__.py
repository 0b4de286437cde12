"""Load balance across EP ranks: windowed expert-load monitoring and expert migration (docs/expert_migration.md).

* :mod:`~piper_ds.balance.load` — one window's tokens per expert, summed over the layer's replicas;
* :mod:`~piper_ds.balance.planner` — the greedy swap plan and its cost/saving test (pure Python);
* :mod:`~piper_ds.balance.controller` — :class:`BalanceController`, called by the engines after every applied
  optimizer step: reports the loads through ``engine.monitor`` and runs the mover every window;
* :mod:`~piper_ds.balance.mover` — ``migrate_experts(engine, moves)``: moves experts with their optimizer state.
"""
from piper_ds.balance.controller import BalanceController, WindowReport
from piper_ds.balance.planner import LayerPlan, greedy_swaps, max_over_mean, plan_layer, rank_loads

__all__ = ["BalanceController", "WindowReport", "LayerPlan", "greedy_swaps", "plan_layer", "rank_loads",
           "max_over_mean"]
