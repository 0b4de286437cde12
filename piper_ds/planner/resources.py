"""Resource model: predicted step time, tokens/s, MFU and their breakdown for one layout.

Per micro-batch and stage (forward + backward), seconds:

- dense: attention projections, dense FFN, shared experts, router, LM head: 6*T*params / dense GEMM rate;
- attention: causal core 6*T*s*H*hd / attention rate;
- experts: 6 * rows * expert params / grouped-GEMM rate at the rows per local expert, on the busiest EP rank
  (rows = T*k*load_imbalance; other ranks wait for it at the combine);
- elementwise: norms, activations, permutes: 2 x saved activation bytes / achieved HBM bandwidth;
- overhead: launches, host syncs and row bookkeeping per block outside the terms above (dense block: a
  constant; MoE block: a constant + a per-routed-row part, see :meth:`PlatformProfile.moe_overhead_seconds`;
  both measured by ``python -m piper_ds.bench.calibrate``);
- a2a: 4 all-to-alls per MoE block (dispatch + combine, forward and backward; 6 with recomputation), less
  what hides under the shared experts (which run during the dispatch) or, with overlap_a2a, under
  overlap_efficiency x the block's compute; overlap_a2a (the two-half schedule) also pays the block overhead
  and the all-to-all latency once per half and runs the grouped GEMMs at half the rows per expert;
- p2p: the stage's activation/gradient sends and receives (blocking, as in DeepSpeed's PipelineEngine).

Step = m x slowest stage + (pp - 1) x slowest stage (the 1F1B bubble; DualPipeV's is smaller, see
:func:`bubble_micro_batches`, and a rank's "stage" is then its two virtual stages) + exposed gradient sync (ZeRO
reduce-scatter/all-reduce over DP and expert-DP, once per step, or per micro-batch with ZeRO-2; all-gather of
updated weights) + optimizer (HBM bound: at ZeRO-1/2 the engines' fused step, one pass per gradient tensor,
or DeepSpeed's step() traffic + torch's AdamW passes; see :func:`optimizer_seconds`).
Activation checkpointing adds one forward of compute and of overhead (x4/3: a forward is a third of
fwd+bwd). MFU uses :meth:`ModelSpec.mfu_flops_per_token`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from piper_ds.planner import comm
from piper_ds.planner.cluster import ClusterSpec
from piper_ds.planner.memory import StageMemory, all_stages, holds_head, rank_blocks, stage_params
from piper_ds.planner.profile import PlatformProfile
from piper_ds.system.activations import block_activations
from piper_ds.system.layout import Layout
from piper_ds.system.specs import ModelSpec

STAGE_PARTS = ("dense", "attention", "experts", "elementwise", "overhead", "a2a", "p2p")
STEP_PARTS = ("compute", "a2a", "p2p", "bubble", "grad_sync", "optimizer")


@dataclass
class Estimate:
    """Prediction for one (model, cluster, layout, profile). Times in seconds, memory in bytes."""

    model: ModelSpec
    cluster: ClusterSpec
    layout: Layout
    memory: List[StageMemory]
    stage_times: List[Dict[str, float]]
    step_parts: Dict[str, float]
    a2a_hidden: float = 0.0
    notes: List[str] = field(default_factory=list)

    @property
    def step_time(self) -> float:
        """Predicted seconds per optimizer step."""
        return sum(self.step_parts.values())

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second, whole job."""
        return self.layout.global_batch * self.model.seq_len / self.step_time

    @property
    def tflops_per_gpu(self) -> float:
        """Model TFLOP/s per GPU by the MFU formula."""
        return self.model.mfu_flops_per_token() * self.tokens_per_s / self.layout.gpus / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation, fraction of the cluster's dense bf16 peak."""
        return self.tflops_per_gpu / self.cluster.peak_tflops

    @property
    def worst(self) -> StageMemory:
        """The stage with the most memory."""
        return max(self.memory, key=lambda m: m.total)

    @property
    def bubble_fraction(self) -> float:
        """Share of the step lost to the pipeline bubble."""
        return self.step_parts["bubble"] / self.step_time


def _block_time(model: ModelSpec, cluster: ClusterSpec, layout: Layout, prof: PlatformProfile,
                moe: bool) -> Dict[str, float]:
    """Forward + backward seconds of one block for one micro-batch, by part (a2a before hiding)."""
    t = layout.micro_batch * model.seq_len
    dense_rate = prof.dense_rate(cluster)
    out = dict.fromkeys(STAGE_PARTS, 0.0)
    out["dense"] = 6.0 * t * model.attention_params_per_layer() / dense_rate
    out["attention"] = 6.0 * t * model.seq_len * model.d_attn / prof.attention_rate(cluster)
    acts = block_activations(model, layout, moe, imbalance=prof.imbalance(layout.ep),
                             attention_saves_scores=prof.attention_saves_scores)
    out["elementwise"] = 2.0 * acts["saved"] / prof.hbm_rate(cluster)
    shared = 0.0
    # The overlap schedule runs every micro-batch as two halves: each pays the block's fixed overhead and its
    # all-to-all latency, and the grouped GEMMs see half the rows per expert.
    halves = 2 if layout.overlap_a2a else 1
    if not moe:
        out["dense"] += 6.0 * t * model.ffn_params(model.ffn_dense) / dense_rate
        out["overhead"] = halves * prof.dense_layer_overhead_us * 1e-6
    else:
        shared = 6.0 * t * model.shared_params_per_layer() / dense_rate
        out["dense"] += 6.0 * t * model.num_experts * model.d_model / dense_rate + shared
        rows = t * model.top_k * prof.imbalance(layout.ep)
        per_expert = rows / (model.num_experts // layout.ep) / halves
        out["experts"] = 6.0 * rows * model.expert_params() / prof.grouped_rate(cluster, per_expert)
        out["overhead"] = halves * prof.moe_overhead_seconds(rows / halves)
        a = 2 if layout.precision == "bf16" else 4
        th = t / halves
        disp = comm.alltoall_seconds(cluster, prof, layout, th, model.top_k, a * model.d_model + 8 * model.top_k)
        comb = comm.alltoall_seconds(cluster, prof, layout, th, model.top_k, a * model.d_model)
        n = 3 if layout.activation_checkpointing else 2  # forward (+ recompute) and backward
        out["a2a"] = halves * n * (disp["seconds"] + comb["seconds"])
    if layout.activation_checkpointing:
        for part in ("dense", "attention", "experts", "elementwise", "overhead"):  # the forward runs twice
            out[part] *= 4.0 / 3.0
    compute = sum(out[p] for p in ("dense", "attention", "experts", "elementwise"))
    hidden = min(out["a2a"], shared)
    if layout.overlap_a2a:
        hidden = max(hidden, min(out["a2a"], prof.overlap_efficiency * compute))
    out["a2a_hidden"] = hidden
    out["a2a"] -= hidden
    return out


def moe_block_seconds(model: ModelSpec, cluster: ClusterSpec, layout: Layout, prof: PlatformProfile) -> float:
    """Seconds per optimizer step one MoE block spends in its routed experts and its exposed all-to-all
    (forward and backward of the step's ``grad_accum`` micro-batches), at the profile's load imbalance: the part
    of the block that waits for the busiest EP rank."""
    part = _block_time(model, cluster, layout, prof, moe=True)
    return layout.grad_accum * (part["experts"] + part["a2a"])


def stage_time(model: ModelSpec, cluster: ClusterSpec, layout: Layout, prof: PlatformProfile,
               stage: int) -> Dict[str, float]:
    """Forward + backward seconds of one micro-batch on ``stage``, by part (+ 'a2a_hidden')."""
    out = dict.fromkeys(STAGE_PARTS + ("a2a_hidden",), 0.0)
    kinds = {}
    for b in rank_blocks(model, layout, stage):
        moe = b >= model.n_dense_layers
        if moe not in kinds:
            kinds[moe] = _block_time(model, cluster, layout, prof, moe)
        for part, v in kinds[moe].items():
            out[part] += v
    a = 2 if layout.precision == "bf16" else 4
    t = layout.micro_batch * model.seq_len
    if holds_head(layout, stage):  # LM head GEMM + cross-entropy over fp32 logits
        out["dense"] += 6.0 * t * model.vocab_size * model.d_model / prof.dense_rate(cluster)
        out["elementwise"] += (a + 12) * t * model.vocab_size / prof.hbm_rate(cluster)
    act = a * t * model.d_model
    for s in (stage - 1, stage):  # boundaries next to this stage, activation forward + gradient backward
        if 0 <= s < layout.pp - 1:  # (DualPipeV crosses each boundary in both phases)
            out["p2p"] += 2 * layout.virtual_stages * comm.p2p_seconds(cluster, prof, layout, s, act)
    return out


def bubble_micro_batches(layout: Layout) -> float:
    """The pipeline bubble of ``layout``'s schedule, in micro-batch forward + backward times of one rank.

    1F1B (and the overlap schedule): pp - 1. DeepSpeed's DualPipeV: pp - 1 less pp virtual-stage forwards,
    pp / 2 x the forward share of a micro-batch (1/3 for forward : backward = 1 : 2, 1/4 with recomputation,
    whose backward holds a second forward). Both exact for the schedules' instruction order with balanced
    stages and free p2p (:mod:`piper_ds.pipeline.simulator`, tested)."""
    if layout.virtual_stages == 1:
        return layout.pp - 1.0
    forward_share = 1.0 / (4.0 if layout.activation_checkpointing else 3.0)
    return layout.pp - 1.0 - layout.pp / 2.0 * forward_share


def grad_sync_seconds(model: ModelSpec, cluster: ClusterSpec, layout: Layout, prof: PlatformProfile,
                      stage: int) -> Dict[str, float]:
    """Gradient reduction and weight all-gather of one step on ``stage``: {'reduce', 'gather', 'exposed'}."""
    n_dense, n_expert = stage_params(model, layout, stage)
    gb = 2 if layout.precision == "bf16" else 4
    dp_ranks = comm.dp_group(layout, stage)
    edp_ranks = comm.edp_group(layout, stage)
    if layout.zero_stage == 0:
        reduce = (comm.allreduce_seconds(cluster, prof, dp_ranks, gb * n_dense)
                  + comm.allreduce_seconds(cluster, prof, edp_ranks, gb * n_expert))
    else:
        reduce = (comm.reduce_scatter_seconds(cluster, prof, dp_ranks, gb * n_dense)
                  + comm.reduce_scatter_seconds(cluster, prof, edp_ranks, gb * n_expert))
    if layout.zero_stage == 2:  # ZeRO-2 reduce-scatters in the backward hooks of every micro-batch
        reduce *= layout.grad_accum
    gather = 0.0
    if layout.precision == "bf16" or layout.zero_stage > 0:  # sharded master weights -> all-gather bf16
        gather = (comm.allgather_seconds(cluster, prof, dp_ranks, gb * n_dense)
                  + comm.allgather_seconds(cluster, prof, edp_ranks, gb * n_expert))
    hide = prof.grad_sync_overlap if (layout.pp == 1 and layout.zero_stage > 0) else 0.0
    return {"reduce": reduce, "gather": gather, "exposed": reduce * (1 - hide) + gather}


#: One fused AdamW kernel per element (fp32 master, fp32 grad, fp32 moments): read p, g, m, v; write p, m, v.
ADAM_FUSED_PASSES: Tuple[Tuple[str, int, int], ...] = (("fused adamw: p, g, m, v -> p, m, v", 4, 3),)

#: torch's foreach AdamW, ``_multi_tensor_adam`` in torch/optim/adam.py (AdamW = decoupled weight decay,
#: no amsgrad, no maximize, capturable off, float beta2): one elementwise pass per foreach op, as
#: (op, fp32 tensors read, fp32 tensors written); a tensor used twice by one op is read once.
ADAM_FOREACH_PASSES: Tuple[Tuple[str, int, int], ...] = (
    ("_foreach_mul_(params, 1 - lr * wd)", 1, 1),
    ("_foreach_lerp_(exp_avgs, grads, 1 - beta1)", 2, 1),
    ("_foreach_mul_(exp_avg_sqs, beta2)", 1, 1),
    ("_foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)", 2, 1),
    ("exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)", 1, 1),
    ("_foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt)", 1, 1),
    ("_foreach_add_(exp_avg_sq_sqrt, eps)", 1, 1),
    ("_foreach_addcdiv_(params, exp_avgs, exp_avg_sq_sqrt, step_size)", 3, 1),
)


def adam_bytes_per_param(fused: bool) -> int:
    """HBM bytes per updated element of one torch/DeepSpeed AdamW update over fp32 gradients (inside DeepSpeed's
    own optimizer steps): 28 fused (one pass), 80 foreach (8 passes)."""
    return sum(4 * (r + w) for _, r, w in (ADAM_FUSED_PASSES if fused else ADAM_FOREACH_PASSES))


def fused_step_bytes_per_param(precision: str) -> int:
    """HBM bytes per sharded element of the engines' fused ZeRO-1/2 step (piper_ds/runtime/zero_step.py), gradient
    clipping on; g = gradient bytes (the model dtype: 2 bf16, 4 fp32).

    The norm reads every gradient once (``torch._foreach_norm`` accumulating in fp32, no copy: g), then one kernel
    per gradient tensor (piper_ds/ops/adamw.py ``adamw_step``) reads it again with the clip coefficient folded in
    (g), reads and writes the fp32 master and both moments in place (24) and writes the updated 16-bit weight
    (g; fp32 training writes its fp32 weight): 30 bytes bf16, 36 fp32. The same whatever torch's fused/foreach
    setting, which the fused step does not run.
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"no fused-step rule for precision={precision!r} (bf16 or fp32)")
    g = 2 if precision == "bf16" else 4
    return g + g + 24 + g


def zero_step_bytes_per_param(precision: str, zero: int) -> int:
    """HBM bytes per element that DeepSpeed's own optimizer step moves around the basic optimizer (AdamW, counted
    by :func:`adam_bytes_per_param`), gradient clipping on.

    ZeRO-1/2, DeepSpeed's ``DeepSpeedZeroOptimizer.step`` (what ``piper.optimizer.fused_step: off`` runs; read
    from DeepSpeed 0.19.8 stage_1_and_2.py ``step()``; g = gradient bytes, 2 bf16 / 4 fp32):
    ``scaled_global_norm`` reads the gradients (g), ``flatten(averaged_gradients[i])`` copies them (2g),
    ``.to(fp32)`` casts (g + 4; nothing for fp32), ``unscale_and_clip_grads`` scales in place (8), and the
    updated master is copied to the 16-bit partition (4 + g): 26 bytes bf16, 28 fp32. ZeRO-0 (no ZeRO optimizer;
    not traced line by line): norm and clip of fp32 gradients (12) plus the bf16 weight copy (6) with bf16.
    """
    g = 2 if precision == "bf16" else 4
    if zero == 0:
        return 12 + (6 if precision == "bf16" else 0)
    if zero in (1, 2):
        return g + 2 * g + (g + 4 if g != 4 else 0) + 8 + (4 + g)
    raise ValueError(f"no optimizer-step rule for zero_stage={zero} (ZeRO-3 is rejected with MoE)")


def optimizer_fused(ds_config: Mapping[str, Any]) -> bool:
    """Whether a ds_config's AdamW runs fused: DeepSpeed's FusedAdam (``torch_adam`` absent/false), or torch
    AdamW with ``"fused": true``; torch AdamW otherwise runs foreach (its CUDA default). It sets the optimizer's
    time and temporaries where DeepSpeed's own step runs the optimizer (ZeRO-0, ``fused_step: off``)."""
    opt = ds_config.get("optimizer") or {}
    kind = str(opt.get("type", "")).lower()
    if kind not in ("adam", "adamw"):
        raise ValueError(f"optimizer type {opt.get('type')!r} is not modelled (Adam/AdamW only)")
    params = opt.get("params") or {}
    if not params.get("torch_adam", False):
        return True
    if params.get("fused"):
        return True
    if params.get("foreach") is False:
        raise ValueError("torch AdamW with fused=false and foreach=false (the for-loop implementation) "
                         "is not modelled")
    return False


def optimizer_seconds(model: ModelSpec, cluster: ClusterSpec, layout: Layout, prof: PlatformProfile,
                      stage: int) -> float:
    """Optimizer step on the local shard, seconds: a rate per element this rank updates x those elements.

    ZeRO-1/2 with ``layout.fused_step`` (the engines' default, piper_ds/runtime/zero_step.py; the planner's
    ds_config, torch AdamW in bf16 or fp32 without offload or ``grad_accum_dtype``, is one it takes, and DeepSpeed
    wraps it in ``DeepSpeedZeroOptimizer``, see :mod:`piper_ds.planner.memory`): ``prof.optimizer_ns_per_param``
    when the profile timed that step (``prof.optimizer_step == "fused"``, bf16; :mod:`piper_ds.bench.zero_step`),
    else :func:`fused_step_bytes_per_param` at the profile's HBM rate. ZeRO-1/2 with DeepSpeed's step
    (``fused_step`` False): the measured figure when the profile timed DeepSpeed's step (bf16, torch's fused
    AdamW) plus, for torch's foreach AdamW, its extra bytes at the HBM rate; else (DeepSpeed's ``step()`` bytes +
    AdamW bytes, fused or foreach) at the HBM rate. ZeRO-0: the latter rule, never a measured figure."""
    n_dense, n_expert = stage_params(model, layout, stage)
    sharded = layout.precision == "bf16" or layout.zero_stage > 0
    n = n_dense / layout.dp + n_expert / layout.edp if sharded else n_dense + n_expert
    hbm = prof.hbm_rate(cluster)
    zero_optimizer = layout.zero_stage in (1, 2)
    step = "fused" if layout.fused_step else "deepspeed"
    measured = (prof.optimizer_ns_per_param if zero_optimizer and prof.optimizer_step == step
                and layout.precision == "bf16" else None)
    if zero_optimizer and layout.fused_step:
        if measured:
            return n * measured * 1e-9
        return n * fused_step_bytes_per_param(layout.precision) / hbm
    adam = adam_bytes_per_param(layout.fused_optimizer)
    if measured:
        return n * (measured * 1e-9 + (adam - adam_bytes_per_param(True)) / hbm)
    return n * (zero_step_bytes_per_param(layout.precision, layout.zero_stage) + adam) / hbm


def estimate(model: ModelSpec, cluster: ClusterSpec, layout: Layout,
             profile: Optional[PlatformProfile] = None) -> Estimate:
    """Predicts memory per stage and the step time breakdown of ``layout``."""
    prof = profile or PlatformProfile()
    if layout.pp * layout.virtual_stages > model.n_layers:
        raise ValueError(f"pp ({layout.pp}) x virtual stages ({layout.virtual_stages}) must be <= n_layers "
                         f"({model.n_layers})")
    if model.num_experts % layout.ep:
        raise ValueError(f"num_experts ({model.num_experts}) must be divisible by ep ({layout.ep})")
    memory = all_stages(model, layout, prof)
    times = [stage_time(model, cluster, layout, prof, s) for s in range(layout.pp)]
    slow = max(range(layout.pp), key=lambda s: sum(times[s][p] for p in STAGE_PARTS))
    st, m = times[slow], layout.grad_accum
    per_mb = sum(st[p] for p in STAGE_PARTS)
    syncs = [grad_sync_seconds(model, cluster, layout, prof, s)["exposed"] for s in range(layout.pp)]
    opts = [optimizer_seconds(model, cluster, layout, prof, s) for s in range(layout.pp)]
    parts = {
        "compute": m * sum(st[p] for p in ("dense", "attention", "experts", "elementwise", "overhead")),
        "a2a": m * st["a2a"],
        "p2p": m * st["p2p"],
        "bubble": bubble_micro_batches(layout) * per_mb,
        "grad_sync": max(syncs),
        "optimizer": max(opts),
    }
    notes = [f"slowest stage {slow}"] if layout.pp > 1 else []
    return Estimate(model=model, cluster=cluster, layout=layout, memory=memory, stage_times=times,
                    step_parts=parts, a2a_hidden=m * st["a2a_hidden"], notes=notes)
