"""What expert migration costs under a layout: bytes per expert, the time of one swap over the EP group's link,
and the break-even imbalance (the rules of :mod:`piper_ds.system.migration`, which the runtime uses too)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from piper_ds.planner.cluster import ClusterSpec
from piper_ds.planner.comm import slowest_tier
from piper_ds.planner.memory import migration_bytes
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.resources import moe_block_seconds
from piper_ds.system.layout import Layout
from piper_ds.system.migration import DEFAULT_WINDOW, break_even_ratio, expert_migration_bytes
from piper_ds.system.specs import ModelSpec


@dataclass(frozen=True)
class MigrationCost:
    """Expert migration of one MoE layer under a layout.

    ``table_iv_bytes``: bytes of one expert with weights, gradient, fp32 master copy and Adam moments (16 per
    parameter in bf16, the Piper paper's Table IV); ``sent_bytes``: what one rank sends per migrated expert
    right after an optimizer step (no gradient; the weights are cast from the master copy on arrival);
    ``swap_seconds``: one swap (one expert each way at once) over ``link`` (``link_gbps`` GB/s);
    ``layer_seconds``: the layer's routed-expert and exposed all-to-all time per step when balanced;
    ``break_even``: the max/mean EP-rank load above which removing the imbalance repays one swap within
    ``window`` steps."""

    moe_layers: int
    expert_params: int
    table_iv_bytes: int
    sent_bytes: int
    link: str
    link_gbps: float
    swap_seconds: float
    layer_seconds: float
    window: int
    break_even: float


def migration_cost(model: ModelSpec, cluster: ClusterSpec, layout: Layout,
                   profile: Optional[PlatformProfile] = None, window: int = DEFAULT_WINDOW) -> Optional[MigrationCost]:
    """The :class:`MigrationCost` of ``layout``; None when nothing can migrate (ep = 1 or no MoE layer)."""
    if layout.ep == 1 or model.n_moe_layers == 0:
        return None
    prof = profile or PlatformProfile()
    bf16 = layout.precision == "bf16"
    sent = expert_migration_bytes(model.expert_params(), weight_bytes=2 if bf16 else 4,
                                  master_copy=bf16 or layout.zero_stage >= 1, with_grads=False,
                                  weights_from_master=True)
    link = slowest_tier(cluster, range(layout.ep))  # an EP group: ep consecutive ranks of a stage
    tier = prof.p2p_tier(cluster, link)
    swap = tier.seconds(sent)
    balanced = moe_block_seconds(model, cluster, layout, prof) / prof.imbalance(layout.ep)
    return MigrationCost(model.n_moe_layers, model.expert_params(), migration_bytes(model), sent, link,
                         tier.bw_gbps, swap, balanced, window, break_even_ratio(swap, balanced, window))
