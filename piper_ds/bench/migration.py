"""Expert migration benchmark: EP-rank load, step time and tokens/s with and without migration.

On the CPU (the default: 4 gloo ranks spawned on this machine, the tiny model below)::

    python -m piper_ds.bench.migration --out docs/results/migration_cpu_x4.json --plot docs/expert_migration_cpu_x4.png

On GPUs, under a launcher (its ranks are used; NCCL, bf16 and ZeRO as the ds_config says; DeepSpeed's launcher
runs a module with ``--module``, torchrun with ``-m``)::

    deepspeed --num_gpus 4 --module piper_ds.bench.migration --config ds_configs/h200_x4.json --layers 14 \\
        --routing skewed --profile ds_configs/profiles/h200_x4.json --out docs/results/migration_h200_x4_skewed.json

**Model.** Without ``--config``: the reference transformer (piper_ds.models) at the tiny preset's dimensions with
E = 16 experts, top-4 (``--top-k``; docs/expert_migration.md says why not 2), every block a PiperMoE, ep = 4 (4
experts per rank, DeepSpeed's contiguous placement to start), fp32, ZeRO-1, AdamW. With ``--config PATH``: the
ds_config's ``piper.model`` (built as examples/train.py builds the reference model), its ZeRO stage, precision,
micro-batch, optimizer, scheduler and clipping, and its ``piper.parallel.ep_size``; ``--layers``, ``--experts``,
``--top-k``, ``--ep`` and ``--micro-batch`` override them when given (``--layers``: all layers, dense ones
included). Trained through ``piper_ds.initialize``; the ``piper.balance`` block gets ``migration`` off/on and
``window`` (``--window``; else the config's ``piper.balance.window`` when it sets one; else 10); its other
keys (``p2p_gbps``, ``threshold``, ...) are the config's.

**Routing.** ``--routing skewed`` (default): a benchmark gate (:class:`~piper_ds.bench.migration_run.SkewedGate`,
swapped into the model here; the layer's code is untouched) draws each token's top-k experts from a
Zipf(``--zipf``) popularity over the experts (Gumbel top-k), the popularity order a random permutation per
layer that drifts (every ``--drift-every`` steps two experts adjacent in the order trade places); the tokens
are random. The draws depend on the seeds only, so both runs route the same tokens to the same experts.
``--routing natural``: the model's own router on byte-level text, the built-in corpus of examples/train.py
(the Python standard library's sources; ``--data`` names another text; random tokens are refused).

**Runs.** Two runs of ``--steps`` optimizer steps on the same tokens: ``static`` (migration off) and
``migration`` (on). Per step (:mod:`piper_ds.bench.migration_run` says exactly what is timed): step time,
tokens/s, ``engine.step()`` time, each rank's MoE forward time, the LM loss, and each layer's max/mean EP-rank
load under the placement the step ran with. Per window: swaps, bytes, the migration's measured seconds against
the seconds the controller's planner predicted (``piper.balance.p2p_gbps``) and, with ``--profile`` or
``--cluster``, against the link-aware rule of ``python -m piper_ds.plan`` (the EP group's point-to-point tier);
``step_excess_s``: ``engine.step()`` time at the window's last step minus the run's median ``engine.step()``
time over the steps after the warm-up that end no window (load reduction, plan and migration as the step sees
them).

**Summary** (steps after ``--warmup``): median step time, tokens/s (at the median step, and over the whole run,
migration steps included), speedup, the largest migration overhead ``step_excess_s / (window x median step)``
(target <= 5 %), the tokens/s ratio over the whole run (target >= 1.15 under skewed routing), the largest
|loss difference| between the runs (absolute and relative; target: the CPU exactness test's 1e-6 relative; the
runs agree bit for bit until the first migration only where the arithmetic is deterministic, and after it to
arithmetic order), and how much closer to 1.0 migration brings the mean max/mean rank load (target 40 %).
Targets are printed as met / missed, never asserted. ``--out`` writes the JSON record (one record per run,
each with command, commit and device, and the per-step series), ``--plot`` a PNG of the rank load and the step
time per step; the table is printed last. ``--tiny``: 6 steps, window 2, for tests.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shlex
import statistics
import sys
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

import torch

TARGET = 0.40  # migration must bring the mean max/mean rank load this much closer to 1.0
OVERHEAD_TARGET = 0.05  # a migration's cost, amortised over its window, as a fraction of a step
TOKENS_RATIO_TARGET = 1.15  # tokens/s with migration over without, under the drifting skew
LOSS_RTOL = 1e-6  # tests/test_migration.py's tolerance where the arithmetic order changes
CPU_DEFAULTS = {"ep": 4, "experts": 16, "layers": 2, "top_k": 4, "micro_batch": 4}
DEFAULT_WINDOW = 10
DEFAULT_CLUSTER = "h200-nvlink-ib400"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m piper_ds.bench.migration", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="ds_config JSON of the runs (model, ZeRO, precision, "
                   "micro-batch, optimizer, EP size); default: the tiny CPU model")
    p.add_argument("--routing", choices=("skewed", "natural"), default="skewed",
                   help="skewed: drifting Zipf router on random tokens; natural: the model's router on text")
    p.add_argument("--data", default=None, help="--routing natural: text file or folder (default: the built-in "
                   "corpus, the Python standard library's sources)")
    p.add_argument("--out", default="bench_migration.json", help="JSON results path")
    p.add_argument("--plot", default=None, help="PNG of the rank load and step time per step (default: beside --out)")
    p.add_argument("--ranks", type=int, default=4, help="gloo ranks to spawn (ignored under a launcher)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default 4, or the config's)")
    p.add_argument("--experts", type=int, default=None, help="routed experts per MoE layer (16, or the config's)")
    p.add_argument("--layers", type=int, default=None, help="layers (2 MoE blocks, or the config's n_layers)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (4, or the config's)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per rank per step (4, or the config's)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the summary")
    p.add_argument("--window", type=int, default=None, help="piper.balance.window (optimizer steps; default: the "
                   f"config's when it sets one, else {DEFAULT_WINDOW})")
    p.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of the expert popularity (skewed)")
    p.add_argument("--drift-every", type=int, default=5, help="steps between two drifts of the popularity order")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cluster", default=None, help="cluster preset of the link-aware prediction (default "
                   f"{DEFAULT_CLUSTER} when --profile is given; none without either)")
    p.add_argument("--profile", default=None, help="platform profile JSON (python -m piper_ds.bench.calibrate) "
                   "whose point-to-point tier prices the link-aware prediction")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the spawned ranks are stopped")
    p.add_argument("--tiny", action="store_true", help="6 steps, window 2: a smoke run for tests")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher passes it
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.window = 6, 2
    if args.config is None:
        for name, value in CPU_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    for name in ("ranks", "ep", "experts", "layers", "top_k", "steps", "window", "drift_every", "micro_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.warmup < args.steps:
        raise ValueError(f"--warmup ({args.warmup}) must be in [0, --steps ({args.steps}))")
    if args.zipf <= 0:
        raise ValueError(f"--zipf must be > 0, got {args.zipf}")
    if args.experts is not None and args.ep is not None and args.experts % args.ep:
        raise ValueError(f"need --experts ({args.experts}) divisible by --ep ({args.ep})")
    if args.routing == "skewed" and args.data is not None:
        raise ValueError(f"--data ({args.data!r}) goes with --routing natural (skewed routing trains on random "
                         "tokens, which its router does not read)")
    if args.routing == "natural" and args.data == "random":
        raise ValueError("--routing natural needs text: random tokens give no natural routing (--data 'random')")
    return args


def bench_config(args, migration: bool) -> Dict[str, Any]:
    """The ds_config of one run (``migration``: ``piper.balance.migration``), validated: ValueError naming the
    value for a config without ``piper.model``, with pp_size > 1, or with an EP size of 1."""
    from piper_ds.config import load_ds_config, parse_piper_config
    if args.config is None:
        cfg = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": 1},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
               "piper": {"model": {"preset": "tiny", "n_layers": args.layers, "num_experts": args.experts,
                                   "top_k": args.top_k},
                         "moe": {"kernels": "reference", "transport": "flat"}, "parallel": {"ep_size": args.ep}}}
    else:
        cfg = copy.deepcopy(load_ds_config(args.config))
        block = cfg.get("piper")
        if not isinstance(block, dict) or not block.get("model"):
            raise ValueError(f'--config {args.config}: the benchmark needs a "piper": {{"model": ...}} block')
        model = dict(block["model"])
        for key, value in (("n_layers", args.layers), ("num_experts", args.experts), ("top_k", args.top_k)):
            if value is not None:
                model[key] = value
        block["model"] = model
        if args.ep is not None:
            block["parallel"] = {**block.get("parallel", {}), "ep_size": args.ep}
        if args.micro_batch is not None:
            cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
            cfg.pop("train_batch_size", None)  # DeepSpeed derives it from the micro-batch and the world
    block = cfg["piper"]
    window = args.window or block.get("balance", {}).get("window", DEFAULT_WINDOW)
    block["balance"] = {**block.get("balance", {}), "migration": migration, "window": window}
    cfg["steps_per_print"] = 10**6  # no engine log lines inside the timed loop
    piper = parse_piper_config(cfg)
    where = f"--config {args.config}" if args.config else "the CPU model"
    if piper.parallel.pp_size != 1:
        raise ValueError(f"{where}: piper.parallel.pp_size is {piper.parallel.pp_size}; the benchmark runs pp = 1")
    if piper.parallel.ep_size < 2:
        raise ValueError(f"{where}: ep_size is {piper.parallel.ep_size}; experts migrate between EP ranks, so the "
                         "benchmark needs ep >= 2 (--ep)")
    return cfg


def run(args) -> Dict[str, Any]:
    """Both runs on every rank of the job (a collective; the process group is started here under a launcher);
    every rank returns the same figures but each run's ``seconds``."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from piper_ds.bench.common import device_name
    from piper_ds.bench.migration_run import run_one
    from piper_ds.config import parse_piper_config
    from piper_ds.runtime.startup import init_distributed
    static_cfg, moving_cfg = bench_config(args, False), bench_config(args, True)
    if not dist.is_initialized() and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # launched on GPUs: this rank's own
    init_distributed(parse_piper_config(static_cfg).runtime)
    torch.manual_seed(args.seed)
    static = run_one(args, static_cfg, migration=False)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    moving = run_one(args, moving_cfg, migration=True)
    closer = (static["ratio_mean"] - moving["ratio_mean"]) / (static["ratio_mean"] - 1.0) \
        if static["ratio_mean"] > 1.0 else math.nan
    return {"runs": {"static": static, "migration": moving}, "closer_to_1": closer, "target": TARGET,
            "target_met": bool(closer >= TARGET) if args.routing == "skewed" else None,
            "backend": dist.get_backend(),
            "device": device_name(torch.device(get_accelerator().current_device_name()))}


def _spawned(rank: int, world: int, argv: List[str]) -> Dict[str, Any]:
    return run(parse_args(argv))


# ---------------------------------------------------------------------------------------------- the record
def summarize_run(run_: Dict[str, Any], warmup: int, window: int) -> Dict[str, Any]:
    """One run's figures over the steps after ``warmup``; also sets each window's ``step_excess_s`` and
    ``overhead`` (its excess over ``window`` median steps; None when no step without a window end is left)."""
    timed = run_["step_s"][warmup:]
    med, per_step = statistics.median(timed), run_["tokens_per_step"]
    ends = {w["train_step"] for w in run_["windows"]}
    plain = [s for i, s in enumerate(run_["optimizer_s"]) if i >= warmup and i + 1 not in ends]
    base = statistics.median(plain) if plain else None
    for w in run_["windows"]:
        w["step_excess_s"] = None if base is None else run_["optimizer_s"][w["train_step"] - 1] - base
        w["overhead"] = None if base is None else w["step_excess_s"] / (window * med)
    return {"median_step_s": med, "tokens_per_s": per_step / med,
            "run_tokens_per_s": per_step * len(timed) / sum(timed), "median_optimizer_s": base,
            "median_moe_s_per_rank": [statistics.median(r[warmup:]) for r in run_["moe_s_per_rank"]]}


def _target(value: Optional[float], op: str, bound: float, applies: bool = True) -> Dict[str, Any]:
    met = None if value is None or not applies else (value <= bound if op == "<=" else value >= bound)
    return {"value": value, "op": op, "bound": bound, "met": met}


def compare(static: Dict[str, Any], moving: Dict[str, Any], window: int, skewed: bool) -> Dict[str, Any]:
    """Migration against static placement (both summarised by :func:`summarize_run`), with the benchmark's targets
    (``met``: True / False, None where it does not apply or nothing was measured)."""
    s, m = static["summary"], moving["summary"]
    migrations = [w for w in moving["windows"] if w["moves"]]
    first = migrations[0]["train_step"] if migrations else len(moving["loss"])
    diffs = [abs(a - b) for a, b in zip(static["loss"], moving["loss"])]
    rel = [d / max(abs(a), 1e-30) for d, a in zip(diffs, static["loss"])]
    overheads = [w["overhead"] for w in migrations if w["overhead"] is not None]
    ratio = m["run_tokens_per_s"] / s["run_tokens_per_s"]
    link = [w["predicted_link_s"] for w in migrations if w.get("predicted_link_s") is not None]
    return {"speedup": s["median_step_s"] / m["median_step_s"], "tokens_per_s_ratio": ratio,
            "migrations": len(migrations), "migration_s": sum(w["migration_s"] for w in migrations),
            "predicted_s": sum(w["predicted_s"] for w in migrations), "predicted_link_s": sum(link) if link else None,
            "max_overhead": max(overheads) if overheads else None,
            "max_mover_overhead": max((w["migration_s"] / (window * m["median_step_s"]) for w in migrations),
                                      default=None),
            "max_abs_loss_diff": max(diffs), "max_rel_loss_diff": max(rel),
            "first_migration_step": migrations[0]["train_step"] if migrations else None,
            "max_rel_loss_diff_before_migration": max(rel[:first], default=0.0),
            "losses_identical_before_migration": all(d == 0 for d in diffs[:first]),
            "targets": {"migration_overhead": _target(max(overheads) if overheads else None, "<=", OVERHEAD_TARGET),
                        "tokens_per_s_ratio": _target(ratio, ">=", TOKENS_RATIO_TARGET, applies=skewed),
                        "loss_rel_diff": _target(max(rel), "<=", LOSS_RTOL)}}


def link_tier(args, ep: int, gpus_per_node: Optional[int]):
    """(description, :class:`~piper_ds.planner.cluster.LinkTier`) of the EP group's point-to-point link as
    ``python -m piper_ds.plan`` prices it (the profile's measured tier, else the cluster's), or None without
    ``--profile`` and ``--cluster``."""
    if args.profile is None and args.cluster is None:
        return None
    from piper_ds.planner.cluster import ClusterSpec
    from piper_ds.planner.comm import slowest_tier
    from piper_ds.planner.profile import PlatformProfile
    cluster = ClusterSpec.preset(args.cluster or DEFAULT_CLUSTER,
                                 **({"gpus_per_node": gpus_per_node} if gpus_per_node else {}))
    profile = PlatformProfile.load(args.profile) if args.profile else PlatformProfile()
    link = slowest_tier(cluster, range(ep))  # an EP group: ep consecutive ranks
    tier = profile.p2p_tier(cluster, link)
    return {"cluster": cluster.name, "profile": args.profile, "link": link, "bw_gbps": tier.bw_gbps,
            "latency_us": tier.latency_us}, tier


def record(args, result: Dict[str, Any], world: int, argv: List[str], launched: bool = False) -> Dict[str, Any]:
    """The JSON record: setup, one record per run (``runs``: peer static | migration, each with command, commit,
    device and its per-step series and summary) and the comparison (``summary``)."""
    from piper_ds.bench.common import commit
    from piper_ds.config import parse_piper_config
    cfg = bench_config(args, migration=False)
    piper = parse_piper_config(cfg)
    window, ep = piper.balance.window, piper.parallel.ep_size
    shown = [a for a in argv if not a.startswith("--local_rank")]
    launcher = f"deepspeed --num_gpus {world} --module" if launched else "python -m"
    command = f"{launcher} piper_ds.bench.migration " + " ".join(shlex.quote(a) for a in shown)
    meta = {"routing": args.routing, "ep": ep, "command": command.strip(), "commit": commit() or "unknown",
            "device": result["device"]}
    link = link_tier(args, ep, piper.topology.gpus_per_node)
    runs = {}
    for name, raw in copy.deepcopy(result["runs"]).items():
        raw["tokens_per_s"] = [raw["tokens_per_step"] / s for s in raw["step_s"]]
        for w in raw["windows"]:
            w["predicted_link_s"] = None if link is None else \
                sum(link[1].seconds(m["max_sent_experts"] * m["bytes_per_expert"]) for m in w["layers"])
        raw["summary"] = summarize_run(raw, args.warmup, window)
        runs[name] = {"peer": name, **meta, **raw}
    summary = compare(runs["static"], runs["migration"], window, args.routing == "skewed")
    data = "random tokens" if args.routing == "skewed" else (args.data or "built-in (Python standard library)")
    return {**meta, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "backend": result["backend"],
            "world": world, "model": cfg["piper"]["model"], "model_spec": piper.model.model_dump(), "ds_config": cfg,
            "data": data, "steps": args.steps, "warmup": args.warmup, "window": window, "zipf": args.zipf,
            "drift_every": args.drift_every, "micro_batch": cfg["train_micro_batch_size_per_gpu"],
            "tokens_per_step": runs["static"]["tokens_per_step"], "seed": args.seed,
            "link": None if link is None else link[0], "runs": runs, "summary": summary,
            "closer_to_1": result["closer_to_1"], "target": result["target"], "target_met": result["target_met"]}


def plot(rec: Dict[str, Any], path: str) -> str:
    """Two panels over the optimizer steps, both runs: the max/mean EP-rank load (mean over layers) and the step
    time; the steps whose window made swaps marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, run_ in rec["runs"].items():
        xs = range(1, len(run_["step_s"]) + 1)
        top.plot(xs, run_["ratio_per_step"], label=f"{name} (mean {run_['ratio_mean']:.2f})", lw=1.2)
        bottom.plot(xs, [1e3 * s for s in run_["step_s"]],
                    label=f"{name} (median {1e3 * run_['summary']['median_step_s']:.1f} ms)", lw=1.2)
    for w in rec["runs"]["migration"]["windows"]:
        if w.get("moves"):
            for ax in (top, bottom):
                ax.axvline(w["train_step"], color="grey", lw=0.5, alpha=0.5)
    top.axhline(1.0, color="k", lw=0.8, ls="--")
    top.set_ylabel("max / mean EP-rank load")
    bottom.set_ylabel("step time (ms)")
    bottom.set_xlabel("optimizer step")
    spec = rec["model_spec"]
    top.set_title(f"{rec['device']}: E={spec['num_experts']}, top-{spec['top_k']}, ep={rec['ep']}, "
                  f"{rec['routing']} routing; window {rec['window']} (grey: swaps)", fontsize=9)
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _verdict(met: Optional[bool]) -> str:
    return {True: "met", False: "missed", None: "n/a"}[met]


def _num(value: Optional[float], fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table(rec: Dict[str, Any]) -> str:
    """The summary table, the targets after it (the rank-load target last)."""
    lines = [f"{'run':<11}{'max/mean':>10}{'last window':>13}{'swaps':>7}{'MB sent':>10}{'migration s':>13}"
             f"{'step ms':>10}{'tokens/s':>12}{'MoE fwd ms':>12}"]
    for name, r in rec["runs"].items():
        w, s = max(1, rec["window"]), r["summary"]
        last = sum(r["ratio_per_step"][-w:]) / len(r["ratio_per_step"][-w:])
        lines.append(f"{name:<11}{r['ratio_mean']:>10.3f}{last:>13.3f}{r['moves']:>7}{r['bytes_moved'] / 1e6:>10.2f}"
                     f"{r['migration_s']:>13.4f}{1e3 * s['median_step_s']:>10.2f}{s['tokens_per_s']:>12,.0f}"
                     f"{1e3 * max(s['median_moe_s_per_rank']):>12.2f}")
    sm, t = rec["summary"], rec["summary"]["targets"]
    lines += [f"medians after {rec['warmup']} warm-up steps; MoE fwd: the slowest rank's median forward time",
              f"speedup (median step) {sm['speedup']:.3f}x; tokens/s over the run, migration steps included: "
              f"{sm['tokens_per_s_ratio']:.3f}x (target >= {TOKENS_RATIO_TARGET}x under skew: "
              f"{_verdict(t['tokens_per_s_ratio']['met'])})",
              f"migrations: {sm['migrations']}, {1e3 * sm['migration_s']:.3g} ms measured in all; predicted "
              f"{1e3 * sm['predicted_s']:.3g} ms at piper.balance.p2p_gbps, "
              f"{_num(None if sm['predicted_link_s'] is None else 1e3 * sm['predicted_link_s'], '.3g')} ms on the "
              "plan's link",
              f"largest migration step overhead over its window: {_num(sm['max_overhead'], '.2%')} of a step "
              f"(mover alone {_num(sm['max_mover_overhead'], '.2%')}; target <= {OVERHEAD_TARGET:.0%}: "
              f"{_verdict(t['migration_overhead']['met'])})",
              f"max |loss diff| {sm['max_abs_loss_diff']:.3g} ({sm['max_rel_loss_diff']:.3g} relative; before the "
              f"first migration {sm['max_rel_loss_diff_before_migration']:.3g}; tolerance {LOSS_RTOL:g}: "
              f"{_verdict(t['loss_rel_diff']['met'])})",
              f"migration brings the mean max/mean rank load {100 * rec['closer_to_1']:.0f}% closer to 1.0 "
              f"(target {100 * rec['target']:.0f}% under skew: "
              f"{_verdict(rec['target_met'])})"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    bench_config(args, migration=False)  # a bad config fails here, before any rank starts
    launched = "RANK" in os.environ
    if launched:  # this process is one rank
        result = run(args)
        import deepspeed.comm as dist
        world, rank = dist.get_world_size(), dist.get_rank()
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return result
    else:
        from piper_ds.testing import run_distributed
        world = args.ranks
        result = run_distributed(_spawned, world, argv, timeout=args.timeout)[0]
    rec = record(args, result, world, argv, launched=launched)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    rec["plot"] = plot(rec, args.plot or os.path.splitext(args.out)[0] + ".png")
    print(table(rec))
    return rec


if __name__ == "__main__":
    main()
