"""Layout validation: train several candidate layouts of the reference model one after the other in the same
processes, and set the planner's predicted step time and peak memory against the measured ones.

Run once on N GPUs of one node (after ``python -m piper_ds.bench.calibrate``)::

    deepspeed --num_gpus 2 --module piper_ds.bench.layouts --profile profile.json --out layouts.json
    torchrun --nproc_per_node 2 -m piper_ds.bench.layouts --profile profile.json --out layouts.json

Candidates (default): the planner's search (:func:`piper_ds.planner.search.search`, pp 1, the given ZeRO
stages, micro-batch <= ``--max-micro-batch``, predicted worst stage <= ``--mem-margin`` x HBM) ranks every
valid layout for N GPUs and the global batch; the bench takes its top ``--top`` and ``--extra`` deliberately
different ones (the predicted slowest, then the best with another ep, then the best with checkpointing
toggled). ``--layouts ep2.z2.mb4,ep1.z1.mb2.ckpt`` names them instead. For each layout: a ds_config from the
planner's own writer (:func:`piper_ds.planner.dsconfig.build_ds_config`, torch fused AdamW), an engine from
``piper_ds.initialize``, ``--warmup`` + ``--steps`` steps on random tokens, the median step time (max over
ranks per step) and ``torch.cuda.max_memory_allocated`` over the training steps (max over ranks). Printed:
predicted vs measured with relative errors and the +-25 % / +-10 % verdicts, and whether the predicted top
choice was the fastest measured. JSON to ``--out`` (rewritten after every layout). ``--tiny``: the tiny model
on CPU (gloo, fp32) for smoke tests. ``--rescore results.json`` (no GPU, no run) sets the stored measurements
against the current planner, e.g. after a change to the model (a stored layout without ``fused_step``
predates that field and ran DeepSpeed's own ZeRO step, and is predicted so).

Model: ``--model`` (a preset or a ds_config JSON's piper.model block, default xmoe-small-swiglu) with
``--n-shared-experts`` (default 2) and ``--n-layers`` (default ``auto``: the most layers <= 14 for which dp N,
ep 1, ZeRO-1, micro-batch 4 is predicted under ``--mem-margin`` x HBM: 14 on 2 H200, 9 on 1).
Activation checkpointing: the model recomputes every block in backward (``build_model(activation_checkpointing=)``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from piper_ds.bench.common import init_distributed, seconds_per_call, sync
from piper_ds.planner.cluster import ClusterSpec
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.resources import Estimate, estimate
from piper_ds.planner.search import SearchOptions, search
from piper_ds.system.layout import Layout
from piper_ds.system.specs import ModelSpec

GB = 1e9
BOUNDS = (0.25, 0.10)  # relative-error verdicts reported for step time and peak memory


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m piper_ds.bench.layouts", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default=None, help="calibrated profile JSON (python -m piper_ds.bench.calibrate)")
    p.add_argument("--out", default="bench_layouts.json", help="results JSON (rank 0)")
    p.add_argument("--model", default="xmoe-small-swiglu", help="model preset or ds_config JSON (piper.model)")
    p.add_argument("--n-shared-experts", type=int, default=2, help="-1 keeps the model's")
    p.add_argument("--n-layers", default="auto", help="blocks, or 'auto' (see the module docstring)")
    p.add_argument("--cluster", default="h200-nvlink-ib400", help="cluster preset for the predictions")
    p.add_argument("--global-batch", type=int, default=0, help="sequences per step; 0 = 4 per GPU")
    p.add_argument("--max-micro-batch", type=int, default=4)
    p.add_argument("--zero-stages", default="1,2", help="ZeRO stages the candidates may use")
    p.add_argument("--top", type=int, default=4, help="best-ranked layouts to measure")
    p.add_argument("--extra", type=int, default=2, help="deliberately different layouts to add")
    p.add_argument("--layouts", default="", help="explicit list, e.g. 'ep2.z2.mb4,ep1.z1.mb2.ckpt'")
    p.add_argument("--mem-margin", type=float, default=0.8, help="candidates' predicted peak <= this x HBM")
    p.add_argument("--kernels", default="auto", choices=["auto", "cuda", "reference"], help="PiperMoE kernels")
    p.add_argument("--warmup", type=int, default=2, help="steps before timing")
    p.add_argument("--steps", type=int, default=4, help="timed steps per layout")
    p.add_argument("--tiny", action="store_true", help="tiny model, fp32, CPU/gloo smoke run")
    p.add_argument("--only", type=int, default=None, metavar="I",
                   help="run only candidate I (0-based) of the list, so that each layout gets a fresh process")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no run: merge the --out files of --only runs into --out and print the verdicts")
    p.add_argument("--rescore", default=None, metavar="JSON",
                   help="no run: set the measurements of a results JSON against the current planner, into --out")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    for name in ("top", "extra", "warmup"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} ({getattr(args, name)}) must be >= 0")
    stages = args.zero_stages.split(",")
    if not stages or any(z.strip() not in ("0", "1", "2") for z in stages):
        raise ValueError(f"--zero-stages ({args.zero_stages!r}) must list stages among 0, 1, 2 "
                         "(ZeRO-3 is rejected with MoE)")
    if args.steps < 1 or not 0 < args.mem_margin <= 1:
        raise ValueError(f"--steps ({args.steps}) must be >= 1 and --mem-margin ({args.mem_margin}) in (0, 1]")
    return args


# ---------------------------------------------------------------------------------------------- what to run
def base_model(args) -> ModelSpec:
    """The model before ``--n-layers``: tiny, or ``--model`` with ``--n-shared-experts``."""
    if args.tiny:
        return ModelSpec.preset("tiny", n_layers=3, n_dense_layers=1, n_shared_experts=1, seq_len=16)
    from piper_ds.bench.calibrate import model_spec
    return model_spec(args.model, None if args.n_shared_experts < 0 else args.n_shared_experts)


def auto_n_layers(base: ModelSpec, cluster: ClusterSpec, gpus: int, prof: PlatformProfile, margin: float,
                  precision: str = "bf16") -> int:
    """The most layers <= 14 (>= n_dense_layers + 1) for which dp ``gpus``, ep 1, ZeRO-1, micro-batch 4 is
    predicted within ``margin`` x HBM. Raises ValueError when not even the smallest fits."""
    lay = Layout(dp=gpus, ep=1, zero_stage=1, micro_batch=4, precision=precision)
    lowest = base.n_dense_layers + 1
    for n in range(max(14, lowest), lowest - 1, -1):
        spec = ModelSpec(**{**base.model_dump(), "n_layers": n})
        if estimate(spec, cluster, lay, prof).worst.total <= margin * cluster.hbm_bytes:
            return n
    raise ValueError(f"{base.name}: even {lowest} layers exceed {margin} x HBM ({cluster.hbm_gib} GiB) at ep 1, "
                     f"ZeRO-1, micro-batch 4 on {gpus} GPUs")


def model_for(args, cluster: ClusterSpec, gpus: int, prof: PlatformProfile) -> ModelSpec:
    """The benchmarked model: :func:`base_model` with ``--n-layers`` (or :func:`auto_n_layers`)."""
    base = base_model(args)
    if args.tiny:
        return base
    n = auto_n_layers(base, cluster, gpus, prof, args.mem_margin) if args.n_layers == "auto" else int(args.n_layers)
    return ModelSpec(**{**base.model_dump(), "n_layers": n})


def parse_layouts(text: str, gpus: int, global_batch: int, precision: str) -> List[Layout]:
    """``'ep2.z2.mb4,ep1.z1.mb2.ckpt'`` -> layouts on ``gpus`` GPUs (pp 1), grad_accum from the global batch."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        fields = {"ckpt": False}
        for tok in item.split("."):
            if tok == "ckpt":
                fields["ckpt"] = True
            elif tok[:2] in ("ep", "mb") and tok[2:].isdigit() or tok[:1] == "z" and tok[1:].isdigit():
                fields[tok[:2] if tok[:2] in ("ep", "mb") else "z"] = int(tok.lstrip("epmbz"))
            else:
                raise ValueError(f"layout {item!r}: unknown part {tok!r} (use epN, zN, mbN, ckpt)")
        ep, zero, mb = fields.get("ep", 1), fields.get("z", 1), fields.get("mb", 1)
        if global_batch % (gpus * mb):
            raise ValueError(f"layout {item!r}: global batch ({global_batch}) must be divisible by GPUs x "
                             f"micro-batch ({gpus} x {mb})")
        out.append(Layout(dp=gpus, ep=ep, zero_stage=zero, micro_batch=mb, grad_accum=global_batch // (gpus * mb),
                          activation_checkpointing=fields["ckpt"], precision=precision))
    return out


def _pick_extras(ranked: List[Estimate], chosen: List[Estimate], n: int) -> List[Tuple[str, Estimate]]:
    """Up to ``n`` layouts unlike the chosen ones: the predicted slowest, the best with another ep than the
    top, the best with checkpointing toggled against the top."""
    if not ranked or n <= 0:
        return []
    top = ranked[0].layout
    rules = [("predicted slowest", lambda e: e is ranked[-1]),
             (f"best with ep != {top.ep}", lambda e: e.layout.ep != top.ep),
             ("best with checkpointing " + ("off" if top.activation_checkpointing else "on"),
              lambda e: e.layout.activation_checkpointing != top.activation_checkpointing)]
    out: List[Tuple[str, Estimate]] = []
    taken = {id(e) for e in chosen}
    for role, rule in rules:
        hit = next((e for e in ranked if rule(e) and id(e) not in taken), None)
        if hit is not None and len(out) < n:
            out.append((role, hit))
            taken.add(id(hit))
    return out


def candidates(spec: ModelSpec, cluster: ClusterSpec, gpus: int, global_batch: int, prof: PlatformProfile,
               args) -> List[Tuple[str, Estimate]]:
    """(role, estimate) of every layout to run, the predicted top choice first when the search chose."""
    precision = "fp32" if args.tiny else "bf16"
    if args.layouts:
        ests = [estimate(spec, cluster, lay, prof) for lay in parse_layouts(args.layouts, gpus, global_batch,
                                                                             precision)]
        return [("given", e) for e in ests]
    zeros = {int(z) for z in args.zero_stages.split(",")}
    res = search(spec, cluster, gpus, global_batch, prof,
                 SearchOptions(pp=1, max_micro_batch=args.max_micro_batch, precision=precision))
    ranked = [e for e in res.ranked if e.layout.zero_stage in zeros
              and e.worst.total <= args.mem_margin * cluster.hbm_bytes]
    if not ranked:
        raise ValueError(f"no layout of {spec.name} ({spec.n_layers} layers) on {gpus} GPUs with ZeRO {sorted(zeros)} "
                         f"is predicted under {args.mem_margin} x HBM; lower --n-layers or --global-batch")
    top = ranked[:args.top]
    return [(f"top {i + 1}", e) for i, e in enumerate(top)] + _pick_extras(ranked, top, args.extra)


# ---------------------------------------------------------------------------------------------- one layout
def ds_config(spec: ModelSpec, est: Estimate, args, gpus_per_node: int) -> Dict[str, Any]:
    """The planner's ds_config for the layout, with torch's fused AdamW (as ds_configs/h200_x*.json) and the
    bench's kernels setting; quiet logging."""
    from piper_ds.planner.dsconfig import build_ds_config
    cfg = build_ds_config(spec, est.layout, est, steps_per_print=10 ** 6)
    cfg["optimizer"]["params"].update({"torch_adam": True, "fused": True})
    cfg["piper"]["moe"]["kernels"] = "reference" if args.tiny else args.kernels
    cfg["piper"]["topology"] = {"gpus_per_node": gpus_per_node}
    return cfg


@contextlib.contextmanager
def fast_init(device: torch.device) -> Iterator[None]:
    """Builds parameters directly on ``device`` and draws routed experts there. The model's own expert init
    seeds a CPU generator per expert (same weights for any EP layout); for a timing run any normal(0, std)
    weights do, and drawing billions of them on the host would take tens of seconds per layout."""
    from piper_ds.moe.experts import INIT_STD, weight_draw

    def on_device(shape, seed: int, expert: int, name: str) -> torch.Tensor:
        return torch.empty(shape, device=device).normal_(0.0, INIT_STD)

    with weight_draw(on_device), torch.device(device):
        yield


def _max_over_ranks(values: List[float], device) -> List[float]:
    import deepspeed.comm as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def train(engine, model, spec: ModelSpec, layout: Layout, warmup: int, steps: int) -> List[float]:
    """Seconds of each timed step (after ``warmup``), max over ranks; random tokens, a fresh batch per
    micro-batch."""
    import deepspeed.comm as dist
    gen = torch.Generator(device=engine.device).manual_seed(1000 + dist.get_rank())
    shape = (layout.micro_batch, spec.seq_len)
    def step(_: int) -> None:
        for _ in range(layout.grad_accum):
            ids = torch.randint(0, spec.vocab_size, shape, device=engine.device, generator=gen)
            logits, aux = engine(ids)
            engine.backward(model.loss(logits, torch.roll(ids, -1, dims=1)) + aux)
            engine.step()

    def together() -> None:
        sync()
        dist.barrier()

    for i in range(warmup):
        together()
        step(i)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # warm-up allocations stay; their peak does not count
    times = seconds_per_call(step, engine.device, steps, clock="host", before=together)
    return _max_over_ranks(times, engine.device)


#: The phases of :func:`phase_breakdown`.
PHASES = ("forward", "backward", "step")


def phase_breakdown(engine, model, spec: ModelSpec, layout: Layout) -> Dict[str, float]:
    """One more step, synchronised between phases: seconds and peak bytes of the forwards, the backwards and
    the ``engine.step()`` calls (summed / maxed over the micro-batches), max over ranks. Run it after the
    timed steps: the synchronisations cost time, and resetting the peak statistics loses the step's peak."""
    import deepspeed.comm as dist
    cuda = torch.cuda.is_available() and engine.device.type == "cuda"
    gen = torch.Generator(device=engine.device).manual_seed(2000 + dist.get_rank())
    shape = (layout.micro_batch, spec.seq_len)
    secs, peaks = dict.fromkeys(PHASES, 0.0), dict.fromkeys(PHASES, 0.0)

    def timed(phase: str, fn):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = fn()
        sync()
        secs[phase] += time.perf_counter() - t0
        if cuda:
            peaks[phase] = max(peaks[phase], float(torch.cuda.max_memory_allocated()))
        return result

    sync()
    dist.barrier()
    for _ in range(layout.grad_accum):
        ids = torch.randint(0, spec.vocab_size, shape, device=engine.device, generator=gen)
        logits, aux = timed("forward", lambda: engine(ids))
        timed("backward", lambda: engine.backward(model.loss(logits, torch.roll(ids, -1, dims=1)) + aux))
        timed("step", engine.step)
        del logits, aux
    values = _max_over_ranks([secs[p] for p in PHASES] + [peaks[p] for p in PHASES], engine.device)
    return {**{f"{p}_s": v for p, v in zip(PHASES, values)},
            **{f"{p}_peak_gb": v / GB for p, v in zip(PHASES, values[len(PHASES):])}}


def run_one(spec: ModelSpec, est: Estimate, role: str, args) -> Dict[str, Any]:
    """Builds, trains and tears down one layout; returns measured vs predicted (same on every rank)."""
    import deepspeed.comm as dist

    import piper_ds
    from piper_ds.models import build_model
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    lay = est.layout
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")  # torchrun's / deepspeed's
    cfg = ds_config(spec, est, args, int(local) if local else dist.get_world_size())
    t0 = time.perf_counter()
    with fast_init(device):
        model = build_model(spec, cfg["piper"]["moe"], ep_size=lay.ep, seed=1234,
                            activation_checkpointing=lay.activation_checkpointing)
    engine, *_ = piper_ds.initialize(model=model, config=cfg)
    setup_s = time.perf_counter() - t0
    after_init = torch.cuda.memory_allocated() if cuda else 0
    times = train(engine, model, spec, lay, args.warmup, args.steps)
    peak, after_init = _max_over_ranks([torch.cuda.max_memory_allocated() if cuda else 0.0, after_init], device)
    phases = phase_breakdown(engine, model, spec, lay)
    engine.destroy()
    del engine, model
    gc.collect()
    leftover = 0.0
    if cuda:
        torch.cuda.empty_cache()
        leftover = _max_over_ranks([torch.cuda.memory_allocated()], device)[0]
        torch.cuda.reset_peak_memory_stats()
    return {"layout": lay.short(), "role": role, "config": lay.model_dump(mode="json"),
            "step_s": statistics.median(times), "step_times_s": times,
            "peak_gb": peak / GB if cuda else None, "allocated_after_init_gb": after_init / GB if cuda else None,
            "allocated_after_cleanup_gb": leftover / GB if cuda else None, "setup_s": setup_s,
            "phases": phases if cuda else {k: v for k, v in phases.items() if k.endswith("_s")},
            "predicted": predicted(est)}


def predicted(est: Estimate) -> Dict[str, Any]:
    """The planner's figures for one layout, as the results JSON keeps them (seconds, GB)."""
    worst = est.worst
    return {"step_s": est.step_time, "peak_gb": worst.total / GB,
            "peak_wo_fragmentation_gb": (worst.total - worst.kinds["fragmentation"]) / GB,
            "peak_phase": worst.peak_phase, "tokens_per_s": est.tokens_per_s,
            "phase_peaks_gb": {ph: sum(k.values()) / GB for ph, k in worst.phases.items()},
            "step_parts_s": dict(est.step_parts)}


# ---------------------------------------------------------------------------------------------- verdicts
def rel_err(predicted: float, measured: Optional[float]) -> Optional[float]:
    """(predicted - measured) / measured; None without a measurement."""
    return None if not measured else (predicted - measured) / measured


def add_errors(result: Dict[str, Any]) -> Dict[str, Any]:
    """Adds relative errors and the +-25 % / +-10 % verdicts of step time and peak memory (the memory
    against the prediction without fragmentation, which ``max_memory_allocated`` does not see)."""
    p = result["predicted"]
    errs = {"step": rel_err(p["step_s"], result["step_s"]),
            "peak": rel_err(p["peak_wo_fragmentation_gb"], result["peak_gb"])}
    result["rel_err"] = errs
    result["within"] = {f"{k}_{int(b * 100)}pct": (None if e is None else abs(e) <= b)
                        for k, e in errs.items() for b in BOUNDS}
    return result


def _spearman(xs: List[float], ys: List[float]) -> Optional[float]:
    """Rank correlation of two equally long lists (no tie correction); None below 2 items."""
    n = len(xs)
    if n < 2:
        return None
    rx = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: xs[i]))}
    ry = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: ys[i]))}
    return 1 - 6 * sum((rx[i] - ry[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


#: Predicted steps closer than this (relative) to the top choice's count as a tie in the verdict's note.
TIE = 1e-3


def top_choice(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Whether the predicted fastest of the measured layouts was the measured fastest, the gap (measured step
    of the top choice / fastest - 1), the other layouts predicted equal to the top choice (``tied``: within
    :data:`TIE`; the verdict stays strict, the table names them) and the rank correlation of predicted and
    measured step times."""
    pred = min(results, key=lambda r: r["predicted"]["step_s"])
    fast = min(results, key=lambda r: r["step_s"])
    best = pred["predicted"]["step_s"]
    tied = [r["layout"] for r in results if r is not pred and abs(r["predicted"]["step_s"] - best) <= TIE * best]
    return {"predicted_top": pred["layout"], "fastest_measured": fast["layout"],
            "top_is_fastest": pred is fast, "gap": pred["step_s"] / fast["step_s"] - 1.0, "tied": tied,
            "spearman": _spearman([r["predicted"]["step_s"] for r in results], [r["step_s"] for r in results])}


def _fmt(v: Optional[float], fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _yes(v: Optional[bool]) -> str:
    return "n/a" if v is None else ("yes" if v else "NO")


def table(results: List[Dict[str, Any]], verdict: Dict[str, Any]) -> str:
    """Predicted vs measured per layout, then the top-choice verdict."""
    lines = [f"{'layout':<32}{'role':<26}{'step s':>8}{'pred':>8}{'err':>8}{'25%':>5}{'10%':>5}"
             f"{'peak GB':>9}{'pred':>8}{'err':>8}{'25%':>5}{'10%':>5}"]
    for r in results:
        e, w, p = r["rel_err"], r["within"], r["predicted"]
        lines.append(f"{r['layout']:<32}{r['role']:<26}{r['step_s']:>8.3f}{p['step_s']:>8.3f}"
                     f"{_fmt(e['step'], '+.1%'):>8}{_yes(w['step_25pct']):>5}{_yes(w['step_10pct']):>5}"
                     f"{_fmt(r['peak_gb'], '.2f'):>9}{p['peak_wo_fragmentation_gb']:>8.2f}"
                     f"{_fmt(e['peak'], '+.1%'):>8}{_yes(w['peak_25pct']):>5}{_yes(w['peak_10pct']):>5}")
    lines.append(f"\n{'layout':<32}{'fwd s':>8}{'bwd s':>8}{'pred':>8}{'step() s':>9}{'pred':>8}"
                 f"{'fwd GB':>8}{'bwd GB':>8}{'pred':>8}{'step() GB':>10}{'pred':>8}")
    for r in results:  # the phase breakdown: predicted compute vs forward + backward, optimizer vs step()
        ph, p = r.get("phases") or {}, r["predicted"]
        parts, peaks = p.get("step_parts_s", {}), p.get("phase_peaks_gb", {})
        if not ph:
            continue
        lines.append(f"{r['layout']:<32}{ph['forward_s']:>8.3f}{ph['backward_s']:>8.3f}"
                     f"{sum(v for k, v in parts.items() if k != 'optimizer'):>8.3f}{ph['step_s']:>9.3f}"
                     f"{parts.get('optimizer', 0.0):>8.3f}{_fmt(ph.get('forward_peak_gb'), '.2f'):>8}"
                     f"{_fmt(ph.get('backward_peak_gb'), '.2f'):>8}{_fmt(peaks.get('backward'), '.2f'):>8}"
                     f"{_fmt(ph.get('step_peak_gb'), '.2f'):>10}{_fmt(peaks.get('step'), '.2f'):>8}")
    v = verdict
    lines.append(f"predicted top choice: {v['predicted_top']}; fastest measured: {v['fastest_measured']}; "
                 f"top choice {'IS' if v['top_is_fastest'] else 'is NOT'} the fastest measured "
                 f"(its step is {v['gap']:+.1%} from the fastest); rank correlation predicted/measured: "
                 f"{_fmt(v['spearman'], '.2f')}")
    if v.get("tied"):
        lines.append(f"predicted equal to the top choice: {', '.join(v['tied'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- driver
def _init_distributed(args) -> Tuple[int, int]:
    """Falls back to --tiny without CUDA, pins the local GPU, starts the process group; (world size, rank)."""
    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA device: running the --tiny CPU mode", flush=True)
        args.tiny = True
    rank, world = init_distributed(cuda=not args.tiny)
    return world, rank


def run(args) -> Dict[str, Any]:
    """Every candidate layout in turn; rank 0 writes ``--out`` after each and prints the table at the end.
    Returns the report (on every rank)."""
    gpus, rank = _init_distributed(args)
    prof = PlatformProfile.load(args.profile) if args.profile else PlatformProfile()
    kernels = "reference" if args.tiny else args.kernels
    calibrated = (prof.measurements.get("block_overhead") or {}).get("kernels")
    if rank == 0 and calibrated is not None and calibrated != kernels:
        print(f"WARNING: the profile's block overheads were measured with kernels={calibrated}, this run uses "
              f"kernels={kernels}: the step predictions carry the other setting's overhead", flush=True)
    cluster = ClusterSpec.preset(args.cluster)
    spec = model_for(args, cluster, gpus, prof)
    global_batch = args.global_batch or 4 * gpus
    cands = candidates(spec, cluster, gpus, global_batch, prof, args)
    report: Dict[str, Any] = {"model": spec.to_block(), "gpus": gpus, "global_batch": global_batch,
                              "profile": args.profile, "profile_source": prof.source, "cluster": cluster.name,
                              "kernels": kernels, "warmup": args.warmup,
                              "steps": args.steps, "candidates": [(r, e.layout.short()) for r, e in cands],
                              "results": []}
    if rank == 0:
        print(f"{spec.name}, {spec.n_layers} layers, {gpus} ranks, global batch {global_batch}: "
              + "; ".join(f"{r}: {e.layout.short()}" for r, e in cands), flush=True)
    if args.only is not None:
        if not 0 <= args.only < len(cands):
            raise ValueError(f"--only {args.only}: there are {len(cands)} candidates (0..{len(cands) - 1})")
        cands = [cands[args.only]]
    start = time.perf_counter()
    for role, est in cands:
        res = add_errors(run_one(spec, est, role, args))
        report["results"].append(res)
        report["top_choice"] = top_choice(report["results"])
        if rank == 0:
            print(f"{res['layout']} ({role}): {res['step_s']:.4f} s (predicted {est.step_time:.4f}), peak "
                  f"{_fmt(res['peak_gb'], '.2f')} GB, setup {res['setup_s']:.1f} s", flush=True)
            if res["allocated_after_cleanup_gb"] and res["allocated_after_cleanup_gb"] > 1.0:
                print(f"WARNING: {res['allocated_after_cleanup_gb']:.2f} GB still allocated after tearing down "
                      f"{res['layout']}: later peaks include it", flush=True)
            _write(report, args.out)
    report["elapsed_s"] = time.perf_counter() - start
    if rank == 0:
        _write(report, args.out)
        print(table(report["results"], report["top_choice"]), flush=True)
        print(f"{len(cands)} layouts in {report['elapsed_s']:.0f} s; results in {args.out}", flush=True)
    return report


def merge(paths: List[str], out: str) -> Dict[str, Any]:
    """One report from the ``--out`` files of ``--only`` runs of the same candidate list (each layout in its
    own processes: no memory left over from the previous one); verdicts recomputed over all results."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    first = reports[0]
    for path, rep in zip(paths, reports):
        if rep["candidates"] != first["candidates"] or rep["model"] != first["model"]:
            raise ValueError(f"{path} was run with another model or candidate list than {paths[0]}")
    order = [layout for _, layout in first["candidates"]]
    results = sorted((r for rep in reports for r in rep["results"]), key=lambda r: order.index(r["layout"]))
    merged = dict(first, results=results, top_choice=top_choice(results),
                  elapsed_s=sum(rep.get("elapsed_s", 0.0) for rep in reports), merged_from=paths)
    _write(merged, out)
    print(table(results, merged["top_choice"]), flush=True)
    return merged


def rescore(path: str, out: str, profile: Optional[str] = None) -> Dict[str, Any]:
    """No run: the measurements of a results JSON set against the CURRENT planner's predictions (same model,
    cluster, layouts; the report's profile unless ``profile`` is given). Each result keeps its earlier
    prediction under ``predicted_before``; the table is printed, then each layout's errors before -> now. A
    layout stored without ``fused_step`` was run before the planner wrote that field, with DeepSpeed's own
    ZeRO step: it is predicted with ``fused_step`` False."""
    with open(path) as f:
        report = json.load(f)
    profile = profile or report.get("profile")
    if profile and not os.path.exists(profile):
        raise ValueError(f"{path} was predicted with profile {profile!r}, which does not exist here: pass --profile")
    prof = PlatformProfile.load(profile) if profile else PlatformProfile()
    spec, cluster = ModelSpec.from_block(report["model"]), ClusterSpec.preset(report["cluster"])
    results = []
    for r in report["results"]:
        est = estimate(spec, cluster, Layout(**{"fused_step": False, **r["config"]}), prof)
        before = r.get("predicted_before", r["predicted"])
        results.append(add_errors(dict(r, predicted=predicted(est), predicted_before=before,
                                       rel_err_before=r.get("rel_err_before", r["rel_err"]))))
    rescored = dict(report, results=results, top_choice=top_choice(results), rescored_from=path,
                    rescored_profile=profile)
    _write(rescored, out)
    print(table(results, rescored["top_choice"]), flush=True)
    print("\nerrors before -> now (predicted - measured) / measured:", flush=True)
    for r in results:
        b, n = r["rel_err_before"], r["rel_err"]
        print(f"  {r['layout']:<32} step {_fmt(b['step'], '+.1%')} -> {_fmt(n['step'], '+.1%')}, "
              f"peak {_fmt(b['peak'], '+.1%')} -> {_fmt(n['peak'], '+.1%')}", flush=True)
    return rescored


def _write(report: Dict[str, Any], path: str) -> None:
    from piper_ds.planner.dsconfig import write_json
    write_json(report, path, indent=1)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m piper_ds.bench.layouts``; returns the exit status."""
    args = parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return 0
    if args.rescore:
        rescore(args.rescore, args.out, args.profile)
        return 0
    run(args)
    import deepspeed.comm as dist
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
