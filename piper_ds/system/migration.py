"""Expert migration's arithmetic, shared by the planner's report and the runtime's balance controller.

Three rules, pure Python:

* **bytes per expert** (:func:`expert_migration_bytes`): what moves when one routed expert changes rank — its
  16-bit weights, the fp32 master copy, both Adam moments and, mid-accumulation, its gradient. With all of them
  in bf16 training that is 2 + 4 + 4 + 4 + 2 = 16 bytes per parameter, the Piper paper's Table IV (48·d·f for
  a SwiGLU expert). The runtime migrates right after an applied optimizer step, when the gradients are gone,
  and the receiver casts the 16-bit weights from the master copy as DeepSpeed does after every step: 12 bytes
  per parameter (fp32 without a master copy: the weights and the moments, 12 too). Under ZeRO-1/2 the mover
  first gathers an expert's sharded state inside its expert-data-parallel group; each replica then sends the
  whole expert, so the bytes one rank sends do not depend on the ZeRO stage.
* **transfer time** (:func:`transfer_seconds`): bytes over a point-to-point bandwidth in GB/s (1e9 B/s).
* **saving and break-even** (:func:`migration_saving_seconds`, :func:`break_even_ratio`): a MoE layer waits
  for its busiest EP rank, so its routed-expert time is proportional to the max rank load. Measured at a
  max/mean rank load ``r0``, a layer taking ``t`` seconds per step takes ``t · r1 / r0`` at ``r1``: over the
  next ``steps`` steps a migration saves ``steps · t · (r0 - r1) / r0`` seconds. It pays when that exceeds
  its transfer time. The break-even imbalance is the ``r0`` at which removing the whole imbalance (``r1`` =
  1) over one window saves exactly the cost: ``1 + cost / (steps · t_balanced)``.
"""
from __future__ import annotations

import math

#: Optimizer steps per balance window (``piper.balance.window``): loads are summed over it, migration decided
#: at its end.
DEFAULT_WINDOW = 100

#: Point-to-point bandwidth assumed for a migration, GB/s (``piper.balance.p2p_gbps``): one 400 Gb/s
#: InfiniBand NIC per GPU. NVLink inside a node is several times faster, so the default overstates the cost
#: of a move within a node rather than understating it across nodes.
DEFAULT_P2P_GBPS = 50.0

#: Share of a step spent in the MoE layers' routed experts and all-to-alls (``piper.balance.moe_time_fraction``),
#: the part that waits for the busiest EP rank.
DEFAULT_MOE_TIME_FRACTION = 0.5

#: Bytes per parameter of the fp32 master copy and of each Adam moment.
FP32_BYTES = 4


def expert_migration_bytes(expert_params: int, weight_bytes: int = 2, master_copy: bool = True,
                           with_grads: bool = True, weights_from_master: bool = False) -> int:
    """Bytes one rank sends to migrate one routed expert of ``expert_params`` parameters.

    ``weight_bytes``: bytes per weight (2 for bf16/fp16, 4 for fp32), also the gradient's; ``master_copy``:
    an fp32 master copy exists (16-bit training, or any ZeRO stage >= 1, whose partition is an fp32 copy);
    ``with_grads``: the gradient moves too (mid-accumulation); ``weights_from_master``: with a master copy the
    weights are not sent, the receiver casts them from it. The defaults give the Piper paper's 16 bytes per
    parameter.
    """
    for name, value in (("expert_params", expert_params), ("weight_bytes", weight_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    states = (FP32_BYTES if master_copy else 0) + 2 * FP32_BYTES
    weights = 0 if (master_copy and weights_from_master) else weight_bytes
    return expert_params * (weights + (weight_bytes if with_grads else 0) + states)


def transfer_seconds(nbytes: float, gbps: float) -> float:
    """Seconds to send ``nbytes`` over a point-to-point link of ``gbps`` GB/s (1e9 bytes per second)."""
    if gbps <= 0:
        raise ValueError(f"bandwidth must be > 0 GB/s, got {gbps}")
    if nbytes < 0:
        raise ValueError(f"bytes must be >= 0, got {nbytes}")
    return nbytes / (gbps * 1e9)


def migration_saving_seconds(ratio_before: float, ratio_after: float, layer_seconds: float, steps: int) -> float:
    """Seconds saved over ``steps`` steps by bringing one layer's max/mean rank load from ``ratio_before`` to
    ``ratio_after``, when the layer takes ``layer_seconds`` per step at ``ratio_before`` (its routed-expert
    time scales with the max rank load). Negative when ``ratio_after`` is the larger."""
    if ratio_before < 1.0 or ratio_after < 1.0:
        raise ValueError(f"max/mean ratios are >= 1.0, got {ratio_before} and {ratio_after}")
    if layer_seconds < 0 or steps < 0:
        raise ValueError(f"layer_seconds and steps must be >= 0, got {layer_seconds} and {steps}")
    return steps * layer_seconds * (ratio_before - ratio_after) / ratio_before


def break_even_ratio(cost_seconds: float, balanced_layer_seconds: float, steps: int) -> float:
    """The max/mean rank load above which removing a layer's whole imbalance, at the price of ``cost_seconds``,
    pays back within ``steps`` steps; ``balanced_layer_seconds``: the layer's routed-expert time per step when
    balanced. Infinity when the layer takes no time."""
    if cost_seconds < 0 or balanced_layer_seconds < 0 or steps < 1:
        raise ValueError(f"need cost_seconds >= 0, balanced_layer_seconds >= 0, steps >= 1; got {cost_seconds}, "
                         f"{balanced_layer_seconds}, {steps}")
    if balanced_layer_seconds == 0:
        return math.inf
    return 1.0 + cost_seconds / (steps * balanced_layer_seconds)
