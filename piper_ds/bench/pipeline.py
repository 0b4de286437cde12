"""Pipelined MoE benchmark: 1F1B vs the all-to-all overlap schedule (and DualPipeV), on pp=2 x ep=N/2 and
pp=1 x ep=N.

Run on N GPUs of one node (N = 2 or 4)::

    deepspeed --num_gpus 4 -m piper_ds.bench.pipeline --out bench_pipeline.json

(or ``deepspeed --num_gpus 4 piper_ds/bench/pipeline.py ...``). Model: the xmoe-small-swiglu dimensions
(d 2048, 64 experts, top-6, f 1408, 16 heads, seq 2048, vocab 32000) with ``--n-layers`` blocks (default 12,
so that pp=1 fits one H200), bf16, ZeRO-1, AdamW. For every (layout, schedule): median step time, tokens/s,
MFU (analytic, 989.5 TFLOP/s peak), measured bubble fraction (1 - time in forward/backward instructions per
step, mean over ranks), share of all-to-all time hidden under the other half's compute (CUDA events), and
the planner's prediction for the same layout beside it. Writes JSON to ``--out``, a timeline PNG per run
next to it, and prints a short table last. ``--tiny`` runs the tiny model on CPU (gloo) for smoke tests.
``--schedules 1f1b,dualpipev`` adds DeepSpeed's DualPipeV (two virtual stages per rank, pp >= 2 layouts only).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m piper_ds.bench.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_pipeline.json", help="JSON results path (PNGs go beside it)")
    p.add_argument("--preset", default="xmoe-small-swiglu")
    p.add_argument("--n-layers", type=int, default=12, help="transformer blocks (first one dense)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per GPU per micro-batch (even)")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--schedules", default="1f1b,overlap")
    p.add_argument("--layouts", default="auto", help="'auto' or e.g. '2x2,1x4' (pp x ep)")
    p.add_argument("--tiny", action="store_true", help="tiny model, fp32, CPU/gloo smoke run")
    p.add_argument("--chunks", type=int, default=1, help="PiperMoE overlap_chunks (1: no in-layer overlap)")
    p.add_argument("--kernel-profile", action="store_true",
                   help="GPU: profile one more step and report the share of NCCL kernel time under compute kernels")
    p.add_argument("--profile", default=None,
                   help="platform profile JSON for the planner's predictions (python -m piper_ds.bench.calibrate)")
    p.add_argument("--watchdog", type=float, default=900.0,
                   help="seconds after which every rank prints all thread stacks and exits non-zero (0: off)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher passes it
    return p.parse_args(argv)


def _layouts(spec: str, world: int) -> List[tuple]:
    if spec == "auto":
        return [(2, world // 2), (1, world)] if world >= 2 else [(1, 1)]
    out = []
    for item in spec.split(","):
        pp, ep = (int(v) for v in item.lower().split("x"))
        out.append((pp, ep))
    return out


def _model_spec(args):
    from piper_ds.system.specs import ModelSpec
    if args.tiny:
        return ModelSpec.preset("tiny", n_layers=4, n_dense_layers=1, n_shared_experts=1, seq_len=16)
    return ModelSpec.preset(args.preset, n_layers=args.n_layers, tie_embeddings=False)


def _ds_config(args, pp: int, ep: int, world: int) -> Dict[str, Any]:
    cfg = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.grad_accum,
           "steps_per_print": 10**6, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "pipeline": {"use_reentrant": False},
           "piper": {"parallel": {"ep_size": ep, "pp_size": pp}, "topology": {"gpus_per_node": world}}}
    if not args.tiny:
        cfg["bf16"] = {"enabled": True}
    return cfg


def _prediction(spec, args, pp: int, ep: int, world: int, schedule: str) -> Dict[str, Any]:
    from piper_ds.planner.cluster import ClusterSpec
    from piper_ds.planner.resources import estimate
    from piper_ds.system.layout import Layout
    layout = Layout(dp=world // pp, ep=ep, pp=pp, zero_stage=1, micro_batch=args.micro_batch,
                    grad_accum=args.grad_accum, precision="fp32" if args.tiny else "bf16",
                    overlap_a2a=schedule == "overlap", virtual_stages=2 if schedule == "dualpipev" else 1)
    from piper_ds.planner.profile import PlatformProfile
    prof = PlatformProfile.load(args.profile) if args.profile else PlatformProfile()
    est = estimate(spec, ClusterSpec.preset("h200-nvlink-ib400"), layout, prof)
    return {"step_s": est.step_time, "tokens_per_s": est.tokens_per_s, "mfu": est.mfu,
            "bubble_fraction": est.bubble_fraction, "a2a_hidden_s": est.a2a_hidden,
            "worst_stage_mem_gib": est.worst.total / 2**30}


def run_one(args, spec, pp: int, ep: int, schedule: str, out_prefix: str) -> Dict[str, Any]:
    """Trains ``warmup + steps`` steps of one (layout, schedule); returns its measurements (rank 0 plots)."""
    import deepspeed.comm as dist
    from piper_ds.pipeline.engine import initialize_pipeline
    from piper_ds.pipeline.model import PiperDualPipeVModule, PiperPipelineModule
    from piper_ds.pipeline.timeline import (TimelineRecorder, a2a_hidden_share, bubble_fraction, gather_intervals,
                                            plot_timeline)
    world, rank = dist.get_world_size(), dist.get_rank()
    moe = {"aux_loss_coef": 0.01, "overlap_chunks": args.chunks,
           **({"kernels": "reference", "transport": "flat"} if args.tiny else {})}
    module_class = PiperDualPipeVModule if schedule == "dualpipev" else PiperPipelineModule
    module = module_class(spec, moe, ep_size=ep, num_stages=pp, micro_batch=args.micro_batch, seed=1234)
    rec = TimelineRecorder()
    engine, *_ = initialize_pipeline(model=module, config=_ds_config(args, pp, ep, world), schedule=schedule,
                                     timeline=rec)
    gen = torch.Generator().manual_seed(rank % (world // pp))
    shape = (args.micro_batch, spec.seq_len)

    def batches():
        for _ in range(args.grad_accum):
            ids = torch.randint(0, spec.vocab_size, shape, generator=gen).to(engine.device)
            yield ids, torch.roll(ids, -1, dims=1)

    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            rec.reset()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine.train_batch(batches())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    ivs = rec.intervals()
    bounds = rec.step_bounds()
    kernel_hidden = _kernel_hidden_share(engine, batches) if args.kernel_profile and torch.cuda.is_available() \
        else float("nan")
    bubbles = [bubble_fraction(ivs, b) for b in bounds]
    hidden, a2a_total = a2a_hidden_share(ivs)
    per_rank = torch.tensor([statistics.mean(bubbles), hidden * a2a_total, a2a_total, statistics.median(times),
                             kernel_hidden],
                            dtype=torch.float64, device=engine.device)
    gathered = [torch.zeros_like(per_rank) for _ in range(world)]
    dist.all_gather(gathered, per_rank)
    stats = torch.stack(gathered).cpu()
    everyone = gather_intervals(rec, step=len(bounds) - 1)  # every rank's last timed step
    png = f"{out_prefix}_pp{pp}_ep{ep}_{schedule}.png"
    if rank == 0:
        plot_timeline(everyone, png, f"pp={pp} x ep={ep}, {schedule}: one step")
    step_s = float(stats[:, 3].max())
    tokens = args.micro_batch * args.grad_accum * (world // pp) * spec.seq_len
    tok_s = tokens / step_s
    peak = 1.0e12 if args.tiny else 989.5e12
    result = {"pp": pp, "ep": ep, "dp": world // pp, "schedule": schedule, "step_s": step_s, "tokens_per_s": tok_s,
              "mfu": spec.mfu_flops_per_token() * tok_s / world / peak, "loss": float(loss),
              "bubble_fraction": float(stats[:, 0].mean()),
              "a2a_hidden_share": float(stats[:, 1].sum() / stats[:, 2].sum()) if float(stats[:, 2].sum()) else 0.0,
              "a2a_seconds_per_rank": float(stats[:, 2].mean()) / max(len(bounds), 1),
              "nccl_kernel_hidden_share": float(stats[:, 4].mean()), "overlap_chunks": args.chunks,
              "stage_layers": [b - a for a, b in zip(module.parts, module.parts[1:])],
              "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None,
              "timeline_png": png, "predicted": _prediction(spec, args, pp, ep, world, schedule)}
    engine.destroy()
    del engine, module
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def _kernel_hidden_share(engine, batches) -> float:
    """One more step under the profiler: the share of NCCL kernel time during which compute kernels run."""
    from torch.profiler import ProfilerActivity, profile
    from piper_ds.pipeline.timeline import kernel_overlap
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.train_batch(batches())
        torch.cuda.synchronize()
    return kernel_overlap([e for e in prof.events() if e.device_type.name == "CUDA"]).hidden_share


def run(args) -> List[Dict[str, Any]]:
    """Every (layout, schedule) of ``args``; rank 0 writes the JSON and prints the table."""
    import deepspeed
    import deepspeed.comm as dist
    deepspeed.init_distributed(dist_backend="gloo" if args.tiny or not torch.cuda.is_available() else "nccl")
    if torch.cuda.is_available() and not args.tiny:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = dist.get_world_size()
    spec = _model_spec(args)
    prefix = os.path.splitext(args.out)[0]
    results = []
    for pp, ep in _layouts(args.layouts, world):
        for schedule in args.schedules.split(","):
            if schedule == "dualpipev" and pp == 1:
                if dist.get_rank() == 0:
                    print(f"[bench.pipeline] pp={pp} ep={ep} dualpipev: skipped, DualPipeV needs pp >= 2", flush=True)
                continue
            if dist.get_rank() == 0:
                print(f"[bench.pipeline] pp={pp} ep={ep} {schedule}: {args.warmup} warm-up + {args.steps} steps",
                      flush=True)
            t0 = time.perf_counter()
            results.append(run_one(args, spec, pp, ep, schedule, prefix))
            if dist.get_rank() == 0:
                print(f"[bench.pipeline] pp={pp} ep={ep} {schedule}: step {results[-1]['step_s']:.3f} s "
                      f"({time.perf_counter() - t0:.0f} s in all)", flush=True)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"model": spec.to_block(), "world": world, "micro_batch": args.micro_batch,
                       "grad_accum": args.grad_accum, "results": results}, f, indent=1)
        print(table(results))
    return results


def table(results: List[Dict[str, Any]]) -> str:
    """The short summary table (measured | planner-predicted)."""
    head = (f"{'layout':<10}{'schedule':<9}{'step s':>9}{'pred':>8}{'tok/s':>10}{'pred':>10}{'MFU%':>7}"
            f"{'pred':>7}{'bubble':>8}{'pred':>7}{'a2a hid':>8}{'nccl hid':>9}")
    lines = [head]
    for r in results:
        p = r["predicted"]
        lines.append(f"{'pp' + str(r['pp']) + 'xep' + str(r['ep']):<10}{r['schedule']:<9}{r['step_s']:>9.3f}"
                     f"{p['step_s']:>8.3f}{r['tokens_per_s']:>10.0f}{p['tokens_per_s']:>10.0f}"
                     f"{100 * r['mfu']:>7.1f}{100 * p['mfu']:>7.1f}{r['bubble_fraction']:>8.2f}"
                     f"{p['bubble_fraction']:>7.2f}{100 * r['a2a_hidden_share']:>7.0f}%"
                     f"{100 * r.get('nccl_kernel_hidden_share', float('nan')):>8.0f}%")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.watchdog < 0:
        raise ValueError(f"--watchdog must be >= 0 seconds, got {args.watchdog}")
    if args.watchdog:
        # A stuck collective must fail loudly with the stacks that show where, not hang the launcher.
        import faulthandler
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    run(args)
    import deepspeed.comm as dist
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
