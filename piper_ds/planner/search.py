"""Layout search: enumerate (pp, dp, ep, ZeRO, micro-batch, checkpointing, all-to-all) for a GPU count and a
global batch, drop every layout that breaks a constraint, rank the rest by predicted tokens/s.

Constraints (each has a short id used in messages and counts):

- ``gpus``: dp * pp equals the GPU count (and the cluster has that many GPUs);
- ``batch``: the global batch is micro_batch * grad_accum * dp;
- ``ep_divides_experts``: num_experts % ep == 0 (ep | dp holds by construction of a Layout);
- ``pp_layers``: pp <= n_layers (2 pp virtual stages with DualPipeV);
- ``pp_moe``: every pipeline rank holds an MoE block under the stage cut (:mod:`piper_ds.system.stages`);
- ``whole_nodes``: a job larger than a node uses whole nodes (the launcher starts gpus_per_node ranks on each);
- ``ep_in_node``: an EP group stays inside one node unless cross-node EP is allowed;
- ``zero3_moe``: no ZeRO-3 (DeepSpeed's native MoE rejects it);
- ``zero_pp``: ZeRO <= 1 when pp > 1 (DeepSpeed's PipelineEngine allows ZeRO 0/1 only);
- ``memory``: the worst stage fits in HBM.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from piper_ds.planner.cluster import GIB, ClusterSpec
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.resources import Estimate, estimate
from piper_ds.system.deepspeed_rules import MAX_ZERO_WITH_PP
from piper_ds.system.layout import Layout
from piper_ds.system.specs import ModelSpec
from piper_ds.system.stages import moe_blocks_per_rank


@dataclass(frozen=True)
class Violation:
    """A broken constraint: its id, a message naming the values, and by how much (units in the message)."""

    constraint: str
    message: str
    excess: float = 0.0


class NothingFits(Exception):
    """No layout satisfies every constraint; the message names the binding one and by how much."""

    def __init__(self, message: str, binding: str):
        super().__init__(message)
        self.binding = binding


@dataclass
class SearchOptions:
    """What the search may vary; a set field pins that dimension."""

    pp: Optional[int] = None
    ep: Optional[int] = None
    zero_stage: Optional[int] = None
    micro_batch: Optional[int] = None
    activation_checkpointing: Optional[bool] = None
    a2a: Optional[str] = None
    max_micro_batch: int = 16
    allow_cross_node_ep: bool = False
    consider_overlap: bool = False
    consider_dualpipev: bool = False
    precision: str = "bf16"


@dataclass
class SearchResult:
    """Feasible estimates ranked best first, and why the other layouts were rejected."""

    ranked: List[Estimate]
    rejected: Counter = field(default_factory=Counter)
    memory_failures: List[Estimate] = field(default_factory=list)
    examples: Dict[str, Violation] = field(default_factory=dict)


def _divisors(n: int) -> List[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def structural_violations(model: ModelSpec, cluster: ClusterSpec, layout: Layout, gpus: int, global_batch: int,
                          allow_cross_node_ep: bool = False) -> List[Violation]:
    """Every non-memory constraint ``layout`` breaks (empty list = structurally valid)."""
    out = []
    if layout.gpus != gpus:
        out.append(Violation("gpus", f"dp*pp ({layout.dp}*{layout.pp}={layout.gpus}) must equal gpus ({gpus})",
                             abs(layout.gpus - gpus)))
    if cluster.n_nodes is not None and gpus > cluster.n_nodes * cluster.gpus_per_node:
        out.append(Violation("gpus", f"gpus ({gpus}) exceed the cluster's {cluster.n_nodes} nodes x "
                             f"{cluster.gpus_per_node}", gpus - cluster.n_nodes * cluster.gpus_per_node))
    if layout.global_batch != global_batch:
        out.append(Violation("batch", f"micro_batch*grad_accum*dp ({layout.micro_batch}*{layout.grad_accum}*"
                             f"{layout.dp}={layout.global_batch}) must equal global batch ({global_batch})"))
    if model.num_experts % layout.ep:
        out.append(Violation("ep_divides_experts",
                             f"num_experts ({model.num_experts}) must be divisible by ep ({layout.ep})"))
    stages = layout.pp * layout.virtual_stages
    if stages > model.n_layers:
        what = f"pp ({layout.pp})" if layout.virtual_stages == 1 else f"DualPipeV's 2 x pp ({stages}) virtual stages"
        out.append(Violation("pp_layers", f"{what} must be <= n_layers ({model.n_layers})",
                             stages - model.n_layers))
    elif layout.pp > 1:
        moe = moe_blocks_per_rank(model, layout.micro_batch, layout.ep, layout.pp, layout.virtual_stages)
        if not all(moe):
            out.append(Violation("pp_moe", f"the stage cut leaves pipeline ranks without MoE blocks (MoE blocks per "
                                 f"rank {moe}); the pipelined engine needs one on every rank", moe.count(0)))
    g = cluster.gpus_per_node
    if layout.gpus > g and layout.gpus % g:
        out.append(Violation("whole_nodes", f"gpus ({layout.gpus}) span nodes of {g} GPUs: a job across nodes "
                             f"fills them (a multiple of {g})", layout.gpus % g))
    in_node = layout.ep <= g and g % layout.ep == 0 or layout.gpus <= g
    if not in_node and not allow_cross_node_ep:
        out.append(Violation("ep_in_node", f"ep ({layout.ep}) crosses nodes of {g} GPUs; allow it with "
                             "--allow-cross-node-ep", layout.ep - g))
    if layout.zero_stage == 3:
        out.append(Violation("zero3_moe", "ZeRO-3 is rejected by DeepSpeed's native MoE; use ZeRO-1 or 2"))
    if layout.pp > 1 and layout.zero_stage > MAX_ZERO_WITH_PP:
        out.append(Violation("zero_pp", f"zero_stage ({layout.zero_stage}) must be <= {MAX_ZERO_WITH_PP} with pp "
                             f"({layout.pp}) > 1: DeepSpeed's PipelineEngine allows ZeRO 0/1 only",
                             layout.zero_stage - MAX_ZERO_WITH_PP))
    return out


def memory_violation(est: Estimate) -> Optional[Violation]:
    """The memory constraint: worst stage total <= HBM; None when it fits."""
    worst, hbm = est.worst, est.cluster.hbm_bytes
    if worst.total <= hbm:
        return None
    over = (worst.total - hbm) / GIB
    return Violation("memory", f"stage {worst.stage} needs {worst.total / GIB:.1f} GiB > HBM "
                     f"{est.cluster.hbm_gib:.1f} GiB (over by {over:.1f} GiB) with {est.layout.short()}", over)


def candidate_layouts(model: ModelSpec, cluster: ClusterSpec, gpus: int, global_batch: int,
                      opts: SearchOptions) -> Iterator[Layout]:
    """All layouts of the search grid (valid or not; constraints are checked separately)."""
    if gpus < 1 or global_batch < 1:
        raise ValueError(f"gpus ({gpus}) and global_batch ({global_batch}) must be >= 1")
    for pp in [opts.pp] if opts.pp else _divisors(gpus):
        if gpus % pp:
            continue
        dp = gpus // pp
        if global_batch % dp:
            continue
        for ep in [opts.ep] if opts.ep else _divisors(dp):
            if dp % ep:
                continue
            zeros = [opts.zero_stage] if opts.zero_stage is not None else ([0, 1] if pp > 1 else [0, 1, 2])
            per_dp = global_batch // dp
            mbs = [opts.micro_batch] if opts.micro_batch else [m for m in _divisors(per_dp)
                                                               if m <= opts.max_micro_batch]
            ckpts = ([opts.activation_checkpointing] if opts.activation_checkpointing is not None
                     else [False, True])
            spans = (ep > cluster.gpus_per_node)
            a2as = [opts.a2a] if opts.a2a else (["flat", "hierarchical"] if spans else ["flat"])
            schedules = [(False, 1)] + ([(True, 1)] if opts.consider_overlap else []) \
                + ([(False, 2)] if opts.consider_dualpipev and pp > 1 else [])
            for zero in zeros:
                for mb in mbs:
                    if per_dp % mb:
                        continue
                    for ck in ckpts:
                        for a2a in a2as:
                            for ov, virtual in schedules:
                                if virtual == 2 and per_dp // mb < 2 * pp:  # DualPipeV: >= 2 pp micro-batches
                                    continue
                                yield Layout(dp=dp, ep=ep, pp=pp, zero_stage=zero, micro_batch=mb,
                                             grad_accum=per_dp // mb, activation_checkpointing=ck, a2a=a2a,
                                             overlap_a2a=ov, virtual_stages=virtual, precision=opts.precision)


def search(model: ModelSpec, cluster: ClusterSpec, gpus: int, global_batch: int,
           profile: Optional[PlatformProfile] = None, opts: Optional[SearchOptions] = None) -> SearchResult:
    """Ranks every feasible layout by predicted tokens/s (ties: less memory first)."""
    opts = opts or SearchOptions()
    prof = profile or PlatformProfile()
    res = SearchResult(ranked=[])
    layouts = list(candidate_layouts(model, cluster, gpus, global_batch, opts))
    if not layouts:
        _explain_empty_grid(res, gpus, global_batch, opts)
    for lay in layouts:
        bad = structural_violations(model, cluster, lay, gpus, global_batch, opts.allow_cross_node_ep)
        if bad:
            for v in bad:
                res.rejected[v.constraint] += 1
                res.examples.setdefault(v.constraint, v)
            continue
        est = estimate(model, cluster, lay, prof)
        mv = memory_violation(est)
        if mv:
            res.rejected["memory"] += 1
            res.memory_failures.append(est)
            continue
        res.ranked.append(est)
    res.ranked.sort(key=lambda e: (-e.tokens_per_s, e.worst.total))
    return res


def _explain_empty_grid(res: SearchResult, gpus: int, global_batch: int, opts: SearchOptions) -> None:
    pps = [opts.pp] if opts.pp else _divisors(gpus)
    for pp in pps:
        if gpus % pp:
            v = Violation("gpus", f"pp ({pp}) must divide gpus ({gpus})")
        elif global_batch % (gpus // pp):
            v = Violation("batch", f"global batch ({global_batch}) must be divisible by dp ({gpus // pp})")
        elif opts.ep and (gpus // pp) % opts.ep:
            v = Violation("ep_divides_dp", f"ep ({opts.ep}) must divide dp ({gpus // pp})")
        else:
            v = Violation("batch", f"micro_batch ({opts.micro_batch}) must divide global_batch/dp "
                          f"({global_batch}/{gpus // pp})")
        res.rejected[v.constraint] += 1
        res.examples.setdefault(v.constraint, v)


def binding_message(res: SearchResult) -> NothingFits:
    """The error for an empty result: memory (with the smallest overshoot) if any layout was only too big,
    else the constraint that rejected the most layouts, with an example naming the values."""
    if res.memory_failures:
        best = min(res.memory_failures, key=lambda e: e.worst.total)
        mv = memory_violation(best)
        lay = best.layout
        hints = ["more GPUs"] + (["activation checkpointing"] if not lay.activation_checkpointing else []) \
            + (["a smaller micro-batch"] if lay.micro_batch > 1 else []) \
            + (["ZeRO-2"] if lay.pp == 1 and lay.zero_stage < 2 else [])
        return NothingFits(f"nothing fits: binding constraint 'memory': {mv.message} (the smallest overshoot "
                           f"of {len(res.memory_failures)} layouts). Try {', '.join(hints)}.", "memory")
    if not res.rejected:
        return NothingFits("nothing fits: the search grid is empty", "grid")
    name, count = res.rejected.most_common(1)[0]
    others = ", ".join(f"{k}: {n}" for k, n in res.rejected.most_common() if k != name)
    return NothingFits(f"nothing fits: binding constraint '{name}' rejected {count} layouts, e.g. "
                       f"{res.examples[name].message}" + (f" (also {others})" if others else ""), name)


def best(res: SearchResult) -> Estimate:
    """The top layout, or raises :class:`NothingFits` naming the binding constraint."""
    if not res.ranked:
        raise binding_message(res)
    return res.ranked[0]


def check_all(model: ModelSpec, cluster: ClusterSpec, ests: Iterable[Estimate], gpus: int,
              global_batch: int, allow_cross_node_ep: bool = False) -> List[Violation]:
    """Every violation among ``ests`` (for tests and audits)."""
    out: List[Violation] = []
    for e in ests:
        out += structural_violations(model, cluster, e.layout, gpus, global_batch, allow_cross_node_ep)
        mv = memory_violation(e)
        if mv:
            out.append(mv)
    return out


__all__: Sequence[str] = ["Violation", "NothingFits", "SearchOptions", "SearchResult", "search", "best",
                          "structural_violations", "memory_violation", "candidate_layouts", "binding_message"]
