"""Memory model: bytes per GPU of every pipeline stage under 1F1B, by kind.

Kinds: weights, grads, optimizer (model states, with ZeRO sharding over DP for dense parameters and over
expert-DP for experts), activations (per in-flight micro-batch; stage i of pp holds min(pp - i, m) under
1F1B, so stage 0 is usually the worst), a2a_buffers (dispatch/combine send buffers of the layer running),
workspace (activation gradients of the block in backward, LM-head logits gradient, cuBLAS/NCCL) and
fragmentation (a share of the dynamic memory). Bytes, per GPU.

Model-state bytes per parameter, (replicated, sharded over D) as DeepSpeed 0.19 allocates them:

=========  =====================================  ==================================================
precision  ZeRO                                   weights / grads / optimizer
=========  =====================================  ==================================================
bf16       0, pp = 1 (FP16_UnfusedOptimizer)      2 / 2 + 4 (bf16 + fp32 copies in step) / 12  -> 20
bf16       0, pp > 1 (BF16_Optimizer)             2 / 2 + 2 + 4 over D / 12 over D       -> 6 + 16/D
bf16       1                                      2 / 2 + 4 over D / 12 over D    -> 4 + 16/D
bf16       2                                      2 / 6 over D / 12 over D        -> 2 + 18/D (= DS estimator)
fp32       0                                      4 / 4 / 8 (plain optimizer)
fp32       1                                      4 / 4 / 12 over D (fp32 partition copy + Adam)
fp32       2                                      4 / 4 over D / 12 over D
=========  =====================================  ==================================================

That table (:func:`model_state_bytes`) is the SUM of the model-state allocations over a step, the quantity
DeepSpeed's ``estimate_zero2_model_states_mem_needs`` reports; at ZeRO-1/2 it counts DeepSpeed's own step, whose
fp32 gradient copy (the bf16 rows' 4 over D of grads) the engines' fused step never allocates (its phases take
only the weights and optimizer columns of the table). Not all of it is alive at once. The peak is
taken per phase (:func:`phase_state_bytes`, :func:`stage_memory`), the larger of:

* backward phase: weights + persistent optimizer states (fp32 master + Adam moments, never freed without
  offload) + the gradients held during backward + activations + all-to-all buffers + workspace;
* step phase (inside ``step()``, activations freed): weights + optimizer states + the gradients still held
  (+ with DeepSpeed's own step: the flat and fp32 copies of the parameter group being updated and the
  optimizer's temporaries).

Read from DeepSpeed 0.19.8 ``runtime/zero/stage_1_and_2.py`` (ZeRO-1/2; bf16 keeps 16-bit gradients since
``engine.get_data_types`` defaults ``grad_accum_dtype`` to the model dtype, so ``use_grad_accum_attribute``
and the fp32 ``_build_compact_grad_partition_buffer`` path are off, and ``_do_optimizer_sanity_check`` picks
``DeepSpeedZeroOptimizer``; it picks ``BF16_Optimizer`` for bf16 ZeRO-1 only with an fp32 ``grad_accum_dtype``,
which the planner's ds_config never sets):

* ZeRO-2 backward: ``reduce_ipg_grads`` clears the gradients of parameters outside the rank's partition and
  ``copy_grads_in_partition`` moves the rest into ``grads_in_partition`` (``torch.empty(..., dtype=self.dtype)``:
  16-bit). "The rest" is every tensor touching the partition, WHOLE (:func:`partition_tensor_elements`): about
  2 bytes per sharded parameter for groups of many small tensors, 2 per replicated one for an expert stack
  that is a group of its own (:func:`stage_grad_buffer`). With gradient accumulation the epilogue keeps the
  sum so far (``all_grad_tensors``, views of the previous buffer) while the next backward fills a new one:
  two buffers at the boundary; ``step()`` reads views of the first;
* ZeRO-1 backward: the gradients are reduced only at the accumulation boundary, every parameter keeps its
  16-bit ``param.grad`` (2 bytes per replicated parameter); ``copy_grads_in_partition`` moves the rank's
  partition into the contiguous buffer, the total stays the same with one micro-batch per step; with
  gradient accumulation the buffer fills while every accumulated ``param.grad`` is still held, so the
  partition's 2 bytes come on top;
* ``step()`` goes over the parameter groups in order. Piper's groups are the dense group, then the MoE groups
  of ``split_params_into_different_moe_groups_for_optimizer``: the expert tensors in order, cut greedily at
  :data:`piper_ds.system.deepspeed_rules.MOE_GROUP_MAX_NUMEL` elements (a larger tensor alone), sharded over
  dp and expert-dp (:func:`moe_group_sizes`). For each group i, ``free_grad_in_param_list(
  params_not_in_partition[i])`` first (ZeRO-1: group i's other gradients go); group i's 16-bit views are
  dropped after its gradients are read (``free_grad_in_param_list(params_in_partition[i])``,
  ``averaged_gradients[i] = None``), and the contiguous 16-bit buffer they view is shared by all groups
  (``_release_ipg_buffers`` already dropped its own reference), so it lives until the LAST group's are read;
* the engines' fused step (the default at ZeRO-1/2, ``Layout.fused_step``; piper_ds/runtime/zero_step.py
  ``FusedStepZeroOptimizer.step``): the gradient norm reads the gradients (model dtype) in place
  (``torch._foreach_norm`` in fp32), then per group one ``adamw_step`` pass per gradient tensor reads them
  where they are and updates the fp32 master and moments in place. No flat copy, no fp32 copy, no optimizer
  temporary: the step phase holds the buffer and (ZeRO-1) the later groups' gradients, largest at the first
  group's update, never more than the backward phase holds;
* DeepSpeed's own step (``piper.optimizer.fused_step: off``, ``Layout.fused_step`` False),
  ``DeepSpeedZeroOptimizer.step``: for group i ``flatten(averaged_gradients[i])`` (a 16-bit copy of the group's
  partition), ``.to(fp32)`` (4 bytes; a no-op for fp32), ``del flat_grad_partition``, the group's views
  dropped, ``_optimizer_step(i)``, then ``single_partition_of_fp32_groups[i].grad = None``: the buffer is freed
  before the last group's update. The group cut bounds these per-group copies: one 185M-element expert stack,
  not all experts of the stage, is cast to fp32 at a time. Optimizer temporaries inside it: torch's foreach
  AdamW (``torch/optim/adam.py`` ``_multi_tensor_adam``) allocates ``exp_avg_sq_sqrt =
  torch._foreach_sqrt(exp_avg_sqs)`` (4 bytes per element of the group); the fused kernels (torch
  ``fused=True``, DeepSpeed's FusedAdam) update in place.

ZeRO's reduction buckets (``setup_buckets``: ``reduce_bucket_size`` 16-bit elements, two with ``overlap_comm``)
fall under ``workspace_gib``.

ZeRO-0 has no ZeRO optimizer; read from DeepSpeed 0.19.8 ``runtime/engine.py`` (``_do_optimizer_sanity_check``,
``zero_grad``), ``runtime/fp16/unfused_optimizer.py`` and ``runtime/bf16_optimizer.py``:

* bf16, pp = 1: the engine wraps torch's AdamW in ``FP16_UnfusedOptimizer`` (its ``DDP_BFLOAT16`` case), which
  keeps an fp32 master copy of every parameter, unsharded, and its Adam moments. Backward leaves 16-bit
  ``param.grad`` only; ``step()`` makes an fp32 copy of every gradient (``fp16_param.grad.to(fp32)``, all
  groups before the update) while the 16-bit ones are still held;
* bf16, pp > 1: the pipeline engine picks ``BF16_Optimizer``: fp32 master partition and moments sharded over
  D, 16-bit ``param.grad`` plus a flat accumulator per group in ``grad_accum_dtype`` (16-bit by default),
  and in ``step()`` an fp32 copy of the rank's partition;
* fp32: the plain optimizer, gradients and moments unsharded.

Without gradient accumulation autograd allocates each gradient while backward frees the activations it came
from, and the engine's ``zero_grad`` drops them after every step: at the start of backward, the peak, the
rank holds the gradients of about one layer (:func:`largest_layer_params`). With accumulation the earlier
micro-batches' gradients are held through the last backward.
"""
from __future__ import annotations

import collections
import functools
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from piper_ds.planner.cluster import GIB
from piper_ds.planner.profile import PlatformProfile
from piper_ds.system.activations import block_activations
from piper_ds.system.deepspeed_rules import greedy_groups
from piper_ds.system.layout import Layout
from piper_ds.system.migration import expert_migration_bytes
from piper_ds.system.specs import ModelSpec
from piper_ds.system.stages import rank_stages, stage_blocks

KINDS = ("weights", "grads", "optimizer", "activations", "a2a_buffers", "workspace", "fragmentation")

#: (precision, zero) -> {kind: (replicated bytes, sharded bytes)} per parameter; see the module table.
STATE_BYTES: Dict[Tuple[str, int], Dict[str, Tuple[int, int]]] = {
    ("bf16", 0): {"weights": (2, 0), "grads": (6, 0), "optimizer": (12, 0)},
    ("bf16", 1): {"weights": (2, 0), "grads": (2, 4), "optimizer": (0, 12)},
    ("bf16", 2): {"weights": (2, 0), "grads": (0, 6), "optimizer": (0, 12)},
    ("fp32", 0): {"weights": (4, 0), "grads": (4, 0), "optimizer": (8, 0)},
    ("fp32", 1): {"weights": (4, 0), "grads": (4, 0), "optimizer": (0, 12)},
    ("fp32", 2): {"weights": (4, 0), "grads": (0, 4), "optimizer": (0, 12)},
}

#: bf16 ZeRO-0 under pipeline parallelism (BF16_Optimizer); see the module table.
BF16_ZERO0_PIPELINE: Dict[str, Tuple[int, int]] = {"weights": (2, 0), "grads": (4, 4), "optimizer": (0, 12)}


def migration_bytes(model: ModelSpec) -> int:
    """Bytes moved to migrate one routed expert with its optimizer state: bf16 weight and gradient, fp32 master
    copy and two Adam moments, 16 per parameter (48*d*f for SwiGLU; the Piper paper's Table IV). The rule is
    :func:`piper_ds.system.migration.expert_migration_bytes`, which the runtime uses too."""
    return expert_migration_bytes(model.expert_params())


def state_rule(precision: str, zero: int, pp: int = 1) -> Dict[str, Tuple[int, int]]:
    """``{kind: (replicated bytes, sharded bytes)}`` per parameter for ``precision``, ``zero`` and ``pp`` (bf16
    ZeRO-0 runs another optimizer wrapper under pipeline parallelism; see the module table)."""
    key = (precision, zero)
    if key not in STATE_BYTES:
        raise ValueError(f"no model-state rule for precision={precision!r}, zero_stage={zero} "
                         "(ZeRO-3 is rejected by DeepSpeed's native MoE; use ZeRO-1 or 2)")
    return BF16_ZERO0_PIPELINE if key == ("bf16", 0) and pp > 1 else STATE_BYTES[key]


def model_state_bytes(n_dense: float, n_expert: float, dp: int, edp: int, zero: int,
                      precision: str = "bf16", pp: int = 1) -> Dict[str, float]:
    """Weights/grads/optimizer bytes on one GPU holding ``n_dense`` dense and ``n_expert`` expert params.

    Dense states shard over ``dp`` ranks, expert states over ``edp`` (expert-data-parallel) ranks.
    """
    return {kind: rep * (n_dense + n_expert) + sh * (n_dense / dp + n_expert / edp)
            for kind, (rep, sh) in state_rule(precision, zero, pp).items()}


def optimizer_temp_bytes(fused: bool) -> int:
    """Temporary bytes per updated element of one group where DeepSpeed's own step runs torch's AdamW (ZeRO-0, or
    ZeRO-1/2 without the fused step): 0 for a fused kernel, 4 for torch's foreach AdamW (its fp32
    ``exp_avg_sq_sqrt``; see the module docstring)."""
    return 0 if fused else 4


def partition_tensor_elements(tensor_numels: Sequence[int], dp: int, alignment: int = 2) -> List[int]:
    """Elements of the tensors of one ZeRO parameter group that DeepSpeed counts as in each rank's partition,
    per rank of the ``dp`` ranks sharding it.

    The group is flattened, padded to a multiple of ``alignment * dp`` and cut into ``dp`` equal partitions;
    a tensor is in rank r's partition when it starts inside it or straddles its start (DeepSpeed 0.19.8
    ``get_partition_info``). ``copy_grads_in_partition`` then keeps the WHOLE gradient of each such tensor in
    the contiguous buffer ``grads_in_partition``, not only the rank's slice: a group of one tensor is held
    whole by every rank. (``alignment``: ``nccl_start_alignment_factor``.)
    """
    if dp < 1 or alignment < 1:
        raise ValueError(f"dp and alignment must be >= 1, got dp={dp}, alignment={alignment}")
    if any(n < 0 for n in tensor_numels):
        raise ValueError(f"tensor sizes must be >= 0, got {list(tensor_numels)}")
    total = sum(tensor_numels)
    unit = alignment * dp
    part = -(-total // unit) * unit // dp
    starts = list(itertools.accumulate(tensor_numels, initial=0))[:-1]
    out = []
    for r in range(dp):
        lo, hi = r * part, (r + 1) * part
        out.append(sum(n for s, n in zip(starts, tensor_numels) if lo <= s < hi or s < lo < s + n))
    return out


def grad_buffer_elements(groups: Sequence[Sequence[int]], dp: int) -> int:
    """Elements of ``grads_in_partition`` on the rank where it is largest: the groups (tensor sizes each), all
    sharded over the same ``dp`` ranks, summed per rank (:func:`partition_tensor_elements`)."""
    per_rank = [0] * dp
    for tensors, count in collections.Counter(tuple(g) for g in groups).items():
        for r, n in enumerate(_partition_elements_cached(tensors, dp)):
            per_rank[r] += count * n
    return max(per_rank, default=0)


@functools.lru_cache(maxsize=256)
def _partition_elements_cached(tensors: Tuple[int, ...], dp: int) -> Tuple[int, ...]:
    return tuple(partition_tensor_elements(tensors, dp))


def moe_group_tensors(model: ModelSpec, layout: Layout, stage: int) -> List[List[int]]:
    """Elements of each tensor of each MoE optimizer group of one GPU of ``stage`` (before ZeRO's sharding):
    the stacked expert tensors of each MoE block, ``w_up`` [E/ep, d, 2f] (SwiGLU's gate and up side by side; f for
    GELU) then ``w_down`` [E/ep, f, d], cut by :func:`greedy_groups`."""
    blocks = [b for b in rank_blocks(model, layout, stage) if b >= model.n_dense_layers]
    per_matrix = model.num_experts // layout.ep * model.d_model * model.d_ffn_expert
    tensors = [(model.n_mats - 1) * per_matrix, per_matrix] * len(blocks)
    return [[tensors[i] for i in group] for group in greedy_groups(tensors)]


def moe_group_sizes(model: ModelSpec, layout: Layout, stage: int) -> List[int]:
    """Elements of each MoE optimizer group of one GPU of ``stage`` (:func:`moe_group_tensors`, summed)."""
    return [sum(group) for group in moe_group_tensors(model, layout, stage)]


def stage_grad_buffer(model: ModelSpec, layout: Layout, stage: int) -> float:
    """Elements of ZeRO's contiguous gradient buffer on one GPU of ``stage``: the expert tensors that touch the
    rank's expert-DP partition, whole (:func:`grad_buffer_elements`), plus the dense partition (n_dense / dp:
    dense groups hold many small tensors, so the whole-tensor excess is left out there)."""
    n_dense, _ = stage_params(model, layout, stage)
    return n_dense / layout.dp + grad_buffer_elements(moe_group_tensors(model, layout, stage), layout.edp)


def phase_state_bytes(n_dense: float, n_expert: float, dp: int, edp: int, zero: int, precision: str = "bf16",
                      fused: bool = True, expert_groups: Optional[Sequence[float]] = None,
                      grad_accum: int = 1, grad_buffer: Optional[float] = None, pp: int = 1,
                      first_grads: Optional[float] = None, fused_step: bool = True) -> Dict[str, Dict[str, float]]:
    """Weights/grads/optimizer bytes alive on one GPU at the peak of each phase, ``{"backward": {...},
    "step": {...}}`` (bytes; step-phase ``optimizer`` includes the optimizer's temporaries, step-phase
    ``grads`` the 16-bit gradients still held plus, with DeepSpeed's own step, the flat/fp32 copies of the
    group being updated).

    ``fused``: the AdamW implementation where DeepSpeed's own step runs it (see
    :func:`piper_ds.planner.resources.optimizer_fused`). ``fused_step``: ZeRO-1/2 take the engines' fused step
    (``Layout.fused_step``; False: DeepSpeed's ``DeepSpeedZeroOptimizer.step``; no effect at ZeRO-0).
    ``expert_groups``: elements of each MoE optimizer group (summing to ``n_expert``; None: one group, see
    :func:`moe_group_sizes`). ``grad_accum`` > 1 with ZeRO-1: the last micro-batch's backward fills the
    contiguous partition buffer (``copy_grads_in_partition``) while every parameter still holds the 16-bit
    gradient accumulated over the earlier micro-batches, so both are alive at once. ``grad_buffer``: elements
    of ZeRO-2's contiguous gradient buffer on this rank (None: the exact partition, ``n_dense / dp + n_expert /
    edp``; :func:`stage_grad_buffer` gives DeepSpeed's, which holds whole tensors). With ZeRO-2 and
    ``grad_accum`` > 1 two such buffers are alive in backward. ``pp``: pipeline stages (bf16 ZeRO-0's
    optimizer wrapper). ``first_grads``: ZeRO-0 without accumulation, the parameters whose gradients are alive
    at the peak of backward (None: every parameter's). The rules are those of the module docstring;
    the step phase is the largest instant over the dense group, then the MoE groups: "group i updated" (fused
    step), or "group i cast to fp32" and "group i updated" (DeepSpeed's step).
    """
    if expert_groups is None:
        expert_groups = [n_expert] if n_expert > 0 else []
    if expert_groups and abs(sum(expert_groups) - n_expert) > 1e-6 * max(1.0, n_expert):
        raise ValueError(f"expert_groups sum to {sum(expert_groups)} elements, n_expert is {n_expert}")
    states = model_state_bytes(n_dense, n_expert, dp, edp, zero, precision, pp)
    weights, opt = states["weights"], states["optimizer"]
    temp = optimizer_temp_bytes(fused)
    # (replicated elements, elements of this rank's partition) per group, in DeepSpeed's order
    groups = [(n_dense, n_dense / dp)] if n_dense > 0 else []
    groups += [(n, n / edp) for n in expert_groups if n > 0]
    if zero == 0:
        return _zero0_phases(n_dense + n_expert, groups, weights, opt, temp, precision, pp, grad_accum, first_grads)
    g = 2 if precision == "bf16" else 4  # gradient dtype = model dtype (grad_accum_dtype default)
    part = sum(p for _, p in groups)
    if grad_buffer is None:
        grad_buffer = part
    elif grad_buffer < part * (1 - 1e-9):
        raise ValueError(f"grad_buffer ({grad_buffer} elements) is smaller than the rank's partition ({part})")
    if zero == 2:  # the buffer; with accumulation the earlier micro-batches' sum (another buffer) beside it
        held = g * grad_buffer * (2 if grad_accum > 1 else 1)
    else:
        held = g * (n_dense + n_expert)
        if grad_accum > 1:  # the boundary backward copies into the partition buffer while the
            held += g * part  # gradients accumulated so far are all still held
    backward = {"weights": weights, "grads": held, "optimizer": opt}
    buffer = g * (grad_buffer if zero == 2 else part)  # contiguous 16-bit gradient buffer, shared by all groups
    best = (-1.0, 0.0, 0.0)  # (total, grads, temporaries)
    for i, (_, p_i) in enumerate(groups):
        later = g * sum(n - p for n, p in groups[i + 1:]) if zero == 1 else 0.0  # ZeRO-1: not yet freed
        if fused_step:  # the update reads the gradients where they are: nothing allocated
            instants: Tuple[Tuple[float, float], ...] = ((buffer + later, 0.0),)
        else:
            cast = buffer + later + (g + (4 if g != 4 else 0)) * p_i  # flat copy + fp32 copy (fp32: one copy)
            # the last group drops the buffer's last views before its update
            update = (buffer if i < len(groups) - 1 else 0.0) + later + 4 * p_i
            instants = ((cast, 0.0), (update, temp * p_i))
        for grads, tmp in instants:
            if grads + tmp > best[0]:
                best = (grads + tmp, grads, tmp)
    step = {"weights": weights, "grads": best[1], "optimizer": opt + best[2]}
    return {"backward": backward, "step": step}


def _zero0_phases(n: float, groups: Sequence[Tuple[float, float]], weights: float, opt: float, temp: int,
                  precision: str, pp: int, grad_accum: int,
                  first_grads: Optional[float]) -> Dict[str, Dict[str, float]]:
    """The phases of ZeRO-0 (module docstring): ``n`` parameters, ``groups`` (replicated, partition) elements."""
    g = 2 if precision == "bf16" else 4  # gradients in the model dtype
    accumulators = precision == "bf16" and pp > 1  # BF16_Optimizer's flat accumulators, 16-bit
    produced = g * (n if grad_accum > 1 or first_grads is None else first_grads)
    held = produced + (g * n if accumulators else 0.0)
    if precision == "fp32":
        copies = 0.0
    else:  # pp = 1: an fp32 copy of every gradient; pp > 1: of the rank's partition of every group
        copies = 4 * (sum(p for _, p in groups) if accumulators else n)
    sharded = accumulators  # only BF16_Optimizer shards the fp32 states
    peak_temp = max((temp * (p if sharded else r) for r, p in groups), default=0.0)
    return {"backward": {"weights": weights, "grads": held, "optimizer": opt},
            "step": {"weights": weights, "grads": g * n + (g * n if accumulators else 0.0) + copies,
                     "optimizer": opt + peak_temp}}


def phase_blocks(model: ModelSpec, layout: Layout, rank: int) -> List[range]:
    """The blocks pipeline rank ``rank`` runs, per phase, under the pipeline's stage cut
    (:func:`piper_ds.system.stages.stage_blocks`): ``[its stage]``, or under DualPipeV ``[virtual stage rank
    (phase 0), virtual stage 2 pp - 1 - rank (phase 1)]``."""
    parts = stage_blocks(model, layout.micro_batch, layout.ep, layout.pp * layout.virtual_stages)
    return [parts[s] for s in rank_stages(layout.pp, layout.virtual_stages, rank)]


def rank_blocks(model: ModelSpec, layout: Layout, rank: int) -> List[int]:
    """Every block pipeline rank ``rank`` holds (:func:`phase_blocks`, in module order)."""
    return [b for blocks in phase_blocks(model, layout, rank) for b in blocks]


def holds_head(layout: Layout, rank: int) -> bool:
    """Whether pipeline rank ``rank`` holds the final norm and LM head (the loss): the last rank, or rank 0 under
    DualPipeV, whose last virtual stage it holds. Rank 0 always holds the embedding."""
    return rank == (0 if layout.virtual_stages == 2 else layout.pp - 1)


def dualpipev_in_flight(pp: int, rank: int) -> Tuple[int, int]:
    """(phase-0, phase-1) micro-batches whose activations rank ``rank`` holds at DualPipeV's peak: (2 pp - rank,
    rank + 1), every state of DeepSpeed's schedule is at or below it (2 pp + 1 virtual-stage activations on every
    rank, where 1F1B's stage s holds pp - s stage activations; tested against the schedule)."""
    return 2 * pp - rank, rank + 1


def stage_params(model: ModelSpec, layout: Layout, stage: int) -> Tuple[int, int]:
    """(dense, expert) parameters held by one GPU of pipeline rank ``stage`` (experts: E/ep per MoE block)."""
    blocks = rank_blocks(model, layout, stage)
    per_block = model.attention_params_per_layer() + 2 * model.d_model
    dense = expert = 0
    for b in blocks:
        dense += per_block
        if b < model.n_dense_layers:
            dense += model.ffn_params(model.ffn_dense)
        else:
            dense += model.num_experts * model.d_model + model.shared_params_per_layer()
            expert += model.num_experts // layout.ep * model.expert_params()
    v = model.vocab_size * model.d_model
    if stage == 0:
        dense += v
    if holds_head(layout, stage):
        dense += model.d_model  # final norm
        # an untied head, or a tied one whose copy DeepSpeed keeps on the last stage when pp > 1 (DualPipeV's
        # rank 0 holds both ends: one table)
        if not model.tie_embeddings or (layout.pp > 1 and layout.virtual_stages == 1):
            dense += v
    return dense, expert


def largest_layer_params(model: ModelSpec, layout: Layout, stage: int) -> int:
    """Parameters of the largest layer pipeline rank ``stage`` holds: one of its blocks (experts: E/ep), or the
    embedding or LM-head table."""
    attention = model.attention_params_per_layer() + 2 * model.d_model
    moe_block = (attention + model.num_experts * model.d_model + model.shared_params_per_layer()
                 + model.num_experts // layout.ep * model.expert_params())
    sizes = [moe_block if b >= model.n_dense_layers else attention + model.ffn_params(model.ffn_dense)
             for b in rank_blocks(model, layout, stage)]
    if stage == 0 or holds_head(layout, stage):
        sizes.append(model.vocab_size * model.d_model)
    return max(sizes, default=0)


@dataclass
class StageMemory:
    """Bytes per GPU of one pipeline stage at its peak, by kind (see :data:`KINDS`).

    ``phases`` holds the kinds of each phase ("backward", "step"); ``kinds`` is the larger one's,
    named by ``peak_phase``.
    """

    stage: int
    blocks: List[range]  # per phase: [the stage's blocks], or DualPipeV's two virtual stages
    in_flight: int
    kinds: Dict[str, float] = field(default_factory=dict)
    phases: Dict[str, Dict[str, float]] = field(default_factory=dict)
    peak_phase: str = "backward"

    @property
    def total(self) -> float:
        """All kinds of the peak phase together, bytes."""
        return sum(self.kinds.values())


def in_flight(layout: Layout, stage: int) -> int:
    """Micro-batches whose activations rank ``stage`` holds at its peak: min(pp - stage, m) under 1F1B; under
    DualPipeV the virtual-stage micro-batches of :func:`dualpipev_in_flight` (2 pp + 1)."""
    if layout.virtual_stages == 2:
        return sum(dualpipev_in_flight(layout.pp, stage))
    return 1 if layout.pp == 1 else min(layout.pp - stage, layout.grad_accum)


def stage_memory(model: ModelSpec, layout: Layout, profile: PlatformProfile, stage: int) -> StageMemory:
    """Memory of one GPU of ``stage`` at its peak phase, by kind (bytes); both phases in ``phases``."""
    phases_blocks = phase_blocks(model, layout, stage)
    blocks = [b for part in phases_blocks for b in part]
    n_dense, n_expert = stage_params(model, layout, stage)
    first = largest_layer_params(model, layout, stage) if layout.zero_stage == 0 and layout.pp == 1 else None
    states = phase_state_bytes(n_dense, n_expert, layout.dp, layout.edp, layout.zero_stage, layout.precision,
                               layout.fused_optimizer, moe_group_sizes(model, layout, stage), layout.grad_accum,
                               stage_grad_buffer(model, layout, stage), layout.pp, first, layout.fused_step)
    kinds = dict(states["backward"])
    a = 2 if layout.precision == "bf16" else 4
    t = layout.micro_batch * model.seq_len
    kinds_of = {moe: block_activations(model, layout, moe, imbalance=profile.imbalance(layout.ep),
                                      attention_saves_scores=profile.attention_saves_scores)
                for moe in (False, True)}
    acts = [kinds_of[bl >= model.n_dense_layers] for bl in blocks]
    per_mb = []  # saved activations of one micro-batch, per phase
    for phase, part in enumerate(phases_blocks):
        saved = sum(kinds_of[bl >= model.n_dense_layers]["saved"] for bl in part)
        if layout.activation_checkpointing:
            saved = len(part) * a * t * model.d_model  # only block inputs are kept
        if stage == 0 and phase == 0:
            saved += a * t * model.d_model  # embedding output
        per_mb.append(saved)
    n_mb = in_flight(layout, stage)
    counts = dualpipev_in_flight(layout.pp, stage) if layout.virtual_stages == 2 else (n_mb, )
    largest = max((x["saved"] for x in acts), default=0.0)
    head = 0.0
    if holds_head(layout, stage):  # one micro-batch: bf16 logits + fp32 upcast for the loss; grad in workspace
        head = (a + 4) * t * model.vocab_size + a * t * 2 * model.d_model
    kinds["activations"] = sum(n * saved for n, saved in zip(counts, per_mb)) + head
    kinds["a2a_buffers"] = max((x["a2a"] for x in acts), default=0.0)
    recompute = largest if layout.activation_checkpointing else 0.0
    head_grad = 4 * t * model.vocab_size if holds_head(layout, stage) else 0.0
    kinds["workspace"] = largest + recompute + head_grad + profile.workspace_gib * GIB
    dynamic = kinds["activations"] + kinds["a2a_buffers"] + kinds["workspace"]
    kinds["fragmentation"] = profile.fragmentation * dynamic
    backward = {k: float(kinds[k]) for k in KINDS}
    step = dict.fromkeys(KINDS, 0.0)
    step.update(states["step"])
    # dynamic in the step phase: what step() allocates above the backward phase's states
    step["fragmentation"] = profile.fragmentation * max(
        0.0, step["grads"] + step["optimizer"] - backward["grads"] - backward["optimizer"])
    step = {k: float(v) for k, v in step.items()}
    peak = "step" if sum(step.values()) > sum(backward.values()) else "backward"
    phases = {"backward": backward, "step": step}
    return StageMemory(stage=stage, blocks=phases_blocks, in_flight=n_mb, kinds=dict(phases[peak]), phases=phases,
                       peak_phase=peak)


def all_stages(model: ModelSpec, layout: Layout, profile: PlatformProfile) -> List[StageMemory]:
    """Memory of every stage (index = stage)."""
    return [stage_memory(model, layout, profile, s) for s in range(layout.pp)]
