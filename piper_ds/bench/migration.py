"""Expert migration on CPU: EP-rank load with and without migration under a skewed, drifting router.

Run on the CPU (4 gloo ranks spawned on this machine; under a launcher on a CPU machine, such as
``deepspeed --num_gpus 4 -m piper_ds.bench.migration ...``, the launched ranks are used instead)::

    python -m piper_ds.bench.migration --out docs/results/migration_cpu_x4.json --plot docs/expert_migration_cpu_x4.png

The model is the reference transformer (piper_ds.models) at the tiny preset's dimensions with E = 16 experts,
top-4 (``--top-k``; docs/expert_migration.md says why not 2), every block a PiperMoE, ep = 4 (4 experts per
rank, DeepSpeed's contiguous placement to start), fp32, ZeRO-1, AdamW, trained on random tokens through
``piper_ds.initialize``. The router is skewed by a benchmark gate (:class:`SkewedGate`, swapped into the model
here; the layer's code is untouched): each token's top-k experts are drawn from a Zipf(``--zipf``) popularity
over the experts (Gumbel top-k: the first choice with probability proportional to popularity, each next one
likewise from the rest), the popularity order a random permutation per layer that drifts (every
``--drift-every`` steps two experts adjacent in the order trade places). The draws depend on the seeds only,
so both runs route exactly the same tokens to the same experts.

Two runs of ``--steps`` optimizer steps: ``static`` (``piper.balance.migration`` off) and ``migration`` (on,
``--window`` steps per window, the library's defaults otherwise). After every step's backward, before the
optimizer step (so before any migration it triggers), the step's tokens per expert (summed over the ranks)
give each layer's max/mean EP-rank load under the placement the step ran with. Reported: the mean over
steps and layers of that ratio per run, how much closer to 1.0 migration brings it
(``(static - migration) / (static - 1)``, target >= 40%), swaps made, bytes sent and migration seconds (from
the balance controller's window reports). ``--out`` writes JSON (with the command and commit), ``--plot`` a
PNG of the ratio per step; the table is printed last. ``--tiny``: a few steps, for tests.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

import torch

from piper_ds.moe.router import RouterOutput, TopKGateFP32

TARGET = 0.40  # migration must bring the mean max/mean rank load this much closer to 1.0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m piper_ds.bench.migration", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="bench_migration.json", help="JSON results path")
    p.add_argument("--plot", default=None, help="PNG of the ratio per step (default: beside --out)")
    p.add_argument("--ranks", type=int, default=4, help="gloo ranks to spawn (ignored under a launcher)")
    p.add_argument("--ep", type=int, default=4, help="expert-parallel size")
    p.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer")
    p.add_argument("--layers", type=int, default=2, help="MoE blocks")
    p.add_argument("--top-k", type=int, default=4, help="experts per token")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--window", type=int, default=10, help="piper.balance.window (optimizer steps)")
    p.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of the expert popularity")
    p.add_argument("--drift-every", type=int, default=5, help="steps between two drifts of the popularity order")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the spawned ranks are stopped")
    p.add_argument("--tiny", action="store_true", help="6 steps, window 2: a smoke run for tests")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher passes it
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.window = 6, 2
    for name in ("ranks", "ep", "experts", "layers", "top_k", "steps", "window", "drift_every", "micro_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.experts % args.ep or args.zipf <= 0:
        raise ValueError(f"need --experts ({args.experts}) divisible by --ep ({args.ep}) and --zipf ({args.zipf}) > 0")
    return args


class SkewedGate(TopKGateFP32):
    """Benchmark-only router: the learned router still runs (its scores give the combine weights and the losses),
    but each token's top-k experts are drawn from ``log_popularity`` (a float [E] buffer the benchmark sets) by
    Gumbel top-k, with this gate's own generator: the routing depends on the seed and the popularity only."""

    def __init__(self, gate: TopKGateFP32, seed: int):
        super().__init__(gate.wg.in_features, gate.num_experts, gate.config)
        self.load_state_dict(gate.state_dict())
        self.register_buffer("log_popularity", torch.zeros(gate.num_experts), persistent=False)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        route = super().forward(x_TD)
        T, K = route.topk_idx_TK.shape
        u = torch.rand((T, self.num_experts), generator=self.generator).clamp_(1e-12, 1.0 - 1e-7)
        keys = self.log_popularity.cpu() - torch.log(-torch.log(u))
        idx = keys.topk(K, dim=1).indices.to(x_TD.device)
        weights = route.scores_TE.gather(1, idx)
        if self.config.normalize_weights:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-20)
        counts = torch.bincount(idx.flatten(), minlength=self.num_experts)
        return RouterOutput(idx, weights * self.config.routed_scaling_factor, counts, route.scores_TE,
                            route.logits_TE)


class Popularity:
    """A Zipf(``s``) popularity over ``num_experts`` experts in a seeded random order that drifts: every
    ``drift_every`` steps two neighbours in the order trade places. The same on every rank."""

    def __init__(self, num_experts: int, s: float, drift_every: int, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(num_experts, generator=self.gen).tolist()  # order[r]: expert of rank r
        self.log_p_R = -s * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
        self.drift_every = drift_every

    def at(self, step: int) -> torch.Tensor:
        """log popularity per expert [E] for ``step`` (call with step = 0, 1, 2, ...)."""
        if step and step % self.drift_every == 0:
            r = int(torch.randint(0, len(self.order) - 1, (1,), generator=self.gen))
            self.order[r], self.order[r + 1] = self.order[r + 1], self.order[r]
        out = torch.empty_like(self.log_p_R)
        out[self.order] = self.log_p_R
        return out


def _ds_config(args, migration: bool) -> Dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
            "steps_per_print": 10**6, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "piper": {"model": _model_block(args), "moe": {"kernels": "reference", "transport": "flat"},
                      "parallel": {"ep_size": args.ep},
                      "balance": {"migration": migration, "window": args.window}}}


def _model_block(args) -> Dict[str, Any]:
    return {"preset": "tiny", "n_layers": args.layers, "num_experts": args.experts, "top_k": args.top_k}


def run_one(args, migration: bool) -> Dict[str, Any]:
    """One run on every rank; returns the per-step ratios and the controller's window figures."""
    import deepspeed.comm as dist
    import piper_ds
    from piper_ds.balance.load import rank_load_ratios
    from piper_ds.config import parse_piper_config
    from piper_ds.data import RandomTokens
    from piper_ds.models import build_model
    cfg = _ds_config(args, migration)
    piper = parse_piper_config(cfg)
    model = build_model(piper.model, piper.moe_for_model(), ep_size=args.ep, seed=args.seed)
    layers = model.moe_layers()
    rank = dist.get_rank() if dist.is_initialized() else 0
    for i, layer in enumerate(layers):
        layer.deepspeed_moe.gate = SkewedGate(layer.deepspeed_moe.gate, seed=args.seed + 1000 * rank + i)
    popularity = [Popularity(args.experts, args.zipf, args.drift_every, args.seed + 7 * i) for i in range(len(layers))]
    engine, *_ = piper_ds.initialize(model=model, config=cfg)
    data = RandomTokens(piper.model.vocab_size, piper.model.seq_len, args.micro_batch, args.seed)
    ratios, t0 = [], time.perf_counter()
    for step in range(args.steps):
        for layer, pop in zip(layers, popularity):
            layer.deepspeed_moe.gate.log_popularity.copy_(pop.at(step))
        x, y = data.get("train", step, 0, rank)
        logits, aux = engine(x.to(engine.device))
        engine.backward(model.loss(logits, y.to(engine.device)) + aux)
        counts_LE, _, _ = engine.expert_load.collect(None)  # this step's tokens per expert, all ranks
        ratios.append(list(rank_load_ratios(counts_LE.tolist(), [m.placement.rank_of.tolist() for m in layers],
                                            [m.ep_size for m in layers])))
        engine.step()
    seconds = time.perf_counter() - t0
    reports = engine.balance.reports
    out = {"migration": migration, "ratio_per_step": [sum(r) / len(r) for r in ratios], "ratio_per_layer_step": ratios,
           "ratio_mean": sum(sum(r) / len(r) for r in ratios) / len(ratios),
           "moves": sum(r.moves for r in reports), "bytes_moved": sum(r.bytes_sent for r in reports),
           "migration_s": sum(r.seconds for r in reports), "seconds": seconds,
           "windows": [{"step": r.step, **{k.split("/", 1)[1]: v for k, v in r.metrics.items()}} for r in reports]}
    engine.destroy()
    return out


def run(args) -> Dict[str, Any]:
    """Both runs on every rank of the job; rank 0's result is the record."""
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(args.seed)
    static = run_one(args, migration=False)
    moving = run_one(args, migration=True)
    closer = (static["ratio_mean"] - moving["ratio_mean"]) / (static["ratio_mean"] - 1.0) \
        if static["ratio_mean"] > 1.0 else math.nan
    return {"runs": {"static": static, "migration": moving}, "closer_to_1": closer, "target": TARGET,
            "target_met": bool(closer >= TARGET)}


def _spawned(rank: int, world: int, argv: List[str]) -> Dict[str, Any]:
    return run(parse_args(argv))


def record(args, result: Dict[str, Any], world: int, argv: List[str]) -> Dict[str, Any]:
    """The JSON record: command, commit, date, setup and both runs."""
    from piper_ds.bench.common import commit
    return {"command": "python -m piper_ds.bench.migration " + " ".join(shlex.quote(a) for a in argv),
            "commit": commit() or "unknown", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": "cpu (gloo)", "world": world, "ep": args.ep, "model": _model_block(args),
            "steps": args.steps, "window": args.window, "zipf": args.zipf, "drift_every": args.drift_every,
            "micro_batch": args.micro_batch, "seed": args.seed, **result}


def plot(rec: Dict[str, Any], path: str) -> str:
    """The max/mean EP-rank load per step (mean over layers) of both runs; windows with swaps marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, run_ in rec["runs"].items():
        ys = run_["ratio_per_step"]
        ax.plot(range(1, len(ys) + 1), ys, label=f"{name} (mean {run_['ratio_mean']:.2f})", lw=1.2)
    for w in rec["runs"]["migration"]["windows"]:
        if w.get("moves"):
            ax.axvline(w["step"], color="grey", lw=0.5, alpha=0.5)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max / mean EP-rank load")
    ax.set_title(f"E={rec['model']['num_experts']}, ep={rec['ep']}, Zipf({rec['zipf']}) drifting; "
                 f"window {rec['window']} (grey: swaps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(rec: Dict[str, Any]) -> str:
    """The summary table."""
    lines = [f"{'run':<11}{'max/mean':>10}{'last window':>13}{'swaps':>7}{'MB sent':>10}{'migration s':>13}"]
    for name, r in rec["runs"].items():
        w = max(1, rec["window"])
        last = sum(r["ratio_per_step"][-w:]) / len(r["ratio_per_step"][-w:])
        lines.append(f"{name:<11}{r['ratio_mean']:>10.3f}{last:>13.3f}{r['moves']:>7}{r['bytes_moved'] / 1e6:>10.2f}"
                     f"{r['migration_s']:>13.4f}")
    lines.append(f"migration brings the mean max/mean rank load {100 * rec['closer_to_1']:.0f}% closer to 1.0 "
                 f"(target {100 * rec['target']:.0f}%: {'met' if rec['target_met'] else 'NOT met'})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if "RANK" in os.environ:  # launched: this process is one rank
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
    rec = record(args, result, world, argv)
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    rec["plot"] = plot(rec, args.plot or os.path.splitext(args.out)[0] + ".png")
    print(table(rec))
    return rec


if __name__ == "__main__":
    main()
