"""One run of the expert-migration benchmark on every rank (:mod:`piper_ds.bench.migration` drives it): the
benchmark router, the clocks, and the training loop with its per-step measurements.

What is timed, per optimizer step (every rank; the series are gathered over the ranks at the end of the run,
so that no timing collective sits inside the loop):

* ``step_s``: the host clock from a device synchronisation before the step's forward to one after its last
  ``engine.step()`` (forward, backward, ``engine.step()``: the optimizer step and, at a window's end, the
  balance controller's load reduction, plan and migration). The batches are on the device and the router's
  popularity is set before the clock starts; the expert-load tally is read after it stops. The record keeps
  the slowest rank's time per step.
* ``optimizer_s``: ``engine.step()`` alone, between two CUDA events on the current stream (the host clock on
  CPU); the slowest rank's per step.
* ``moe_s``: each rank's MoE forward time: a forward pre-hook and a forward hook on every MoE layer put a CUDA
  event (the host clock on CPU) before and after the layer's forward, summed over the layers and the step's
  forwards (recomputed forwards under activation checkpointing included). It covers the router, the dispatch
  and combine all-to-alls, the routed and shared experts of the forward; the backward is not timed. A rank
  that waits in an all-to-all for a busier one counts the wait.
* ``loss``: the step's LM loss (cross-entropy, without the aux loss), mean over the ranks.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from piper_ds.bench.common import Clock
from piper_ds.moe.router import RouterOutput, TopKGateFP32


class SkewedGate(TopKGateFP32):
    """Benchmark-only router: the learned router still runs (its scores give the combine weights and the losses),
    but each token's top-k experts are drawn from ``log_popularity`` (a float [E] buffer the benchmark sets) by
    Gumbel top-k, with this gate's own generator (on the device of the tokens, made at the first forward): the
    routing depends on the seed and the popularity only."""

    def __init__(self, gate: TopKGateFP32, seed: int):
        super().__init__(gate.wg.in_features, gate.num_experts, gate.config)
        self.load_state_dict(gate.state_dict())
        self.gating_fn = gate.gating_fn  # the learned router runs as in the model (a fused kernel where it had one)
        self.register_buffer("log_popularity", torch.zeros(gate.num_experts), persistent=False)
        self.seed = seed
        self.generator: Optional[torch.Generator] = None

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        route = super().forward(x_TD)
        T, K = route.topk_idx_TK.shape
        if self.generator is None:
            self.generator = torch.Generator(device=x_TD.device).manual_seed(self.seed)
        u = torch.rand((T, self.num_experts), generator=self.generator, device=x_TD.device)
        keys = self.log_popularity.float() - torch.log(-torch.log(u.clamp_(1e-12, 1.0 - 1e-7)))
        idx = keys.topk(K, dim=1).indices
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


class MoEForwardTimer:
    """The forward time of ``layers`` (MoE modules) through a forward pre-hook and a forward hook on each:
    :meth:`take` returns the seconds since the last call, summed over the layers' forwards (call it after a
    synchronisation)."""

    def __init__(self, layers: Sequence[torch.nn.Module], clock: Clock):
        self.clock, self.marks, self.open = clock, [], {}
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._start))
            self.handles.append(layer.register_forward_hook(self._stop))

    def _start(self, module, args) -> None:
        self.open[id(module)] = self.clock.mark()

    def _stop(self, module, args, output) -> None:
        self.marks.append((self.open.pop(id(module)), self.clock.mark()))

    def take(self) -> float:
        marks, self.marks = self.marks, []
        return sum(self.clock.seconds(a, b) for a, b in marks)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _max_sent(swaps: Sequence[Sequence[int]], rank_of: Sequence[int], ep_size: int) -> int:
    """Experts sent by the EP rank that sends the most in ``swaps`` (each swap: one expert each way)."""
    sent = [0] * ep_size
    for a, b in swaps:
        sent[rank_of[a]] += 1
        sent[rank_of[b]] += 1
    return max(sent)


def _batches(args, piper, micro: int):
    """Skewed routing: uniform random tokens (the router's draws do not read them). Natural routing: byte-level
    text, ``args.data`` or the built-in corpus (examples/train.py's default data)."""
    from piper_ds.data import RandomTokens, make_batches
    spec, dc = piper.model, piper.data
    if args.routing == "skewed":
        return RandomTokens(spec.vocab_size, spec.seq_len, micro, args.seed)
    return make_batches(args.data, spec.vocab_size, spec.seq_len, micro, dc.seed, dc.val_fraction, dc.max_bytes)


def run_one(args, cfg: Dict[str, Any], migration: bool) -> Dict[str, Any]:
    """One run of ``args.steps`` optimizer steps under the ds_config ``cfg`` (its ``piper.balance.migration``
    is ``migration``), on every rank (a collective). Returns the same dict on every rank (except ``seconds``,
    this rank's wall time): the per-step series of the module docstring, the max/mean EP-rank load per step and
    layer, and one entry per balance window."""
    import torch.distributed as dist

    import piper_ds
    from piper_ds.balance.load import rank_load_ratios
    from piper_ds.bench.common import sync
    from piper_ds.config import parse_piper_config
    from piper_ds.models import build_model
    piper = parse_piper_config(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(piper.model, piper.moe_for_model(), ep_size=piper.parallel.ep_size, seed=args.seed,
                        activation_checkpointing="activation_checkpointing" in cfg)
    layers = model.moe_layers()
    popularity: List[Popularity] = []
    if args.routing == "skewed":
        for i, layer in enumerate(layers):
            layer.deepspeed_moe.gate = SkewedGate(layer.deepspeed_moe.gate, seed=args.seed + 1000 * rank + i)
        popularity = [Popularity(piper.model.num_experts, args.zipf, args.drift_every, args.seed + 7 * i)
                      for i in range(len(layers))]
    engine, *_ = piper_ds.initialize(model=model, config=cfg)
    device, gas, micro = engine.device, engine.gradient_accumulation_steps(), engine.train_micro_batch_size_per_gpu()
    data = _batches(args, piper, micro)
    clock = Clock(device)
    moe_timer = MoEForwardTimer(layers, clock)
    mine: Dict[str, List[float]] = {"step_s": [], "optimizer_s": [], "moe_s": [], "loss": []}
    ratios, windows, t_run = [], [], time.perf_counter()
    for step in range(args.steps):
        for layer, pop in zip(layers, popularity):
            layer.deepspeed_moe.gate.log_popularity.copy_(pop.at(step))
        batches = [tuple(t.to(device) for t in data.get("train", step, i, rank)) for i in range(gas)]
        rank_ofs = [m.placement.rank_of.tolist() for m in layers]  # the placement this step runs with
        seen = len(engine.balance.reports)
        lm_sum, marks = torch.zeros((), dtype=torch.float64, device=device), []
        sync(device)
        t0 = time.perf_counter()
        for x, y in batches:
            logits, aux = engine(x)
            lm = model.loss(logits, y)
            engine.backward(lm + aux)
            start = clock.mark()
            engine.step()
            marks.append((start, clock.mark()))
            lm_sum += lm.detach().double()
        sync(device)
        mine["step_s"].append(time.perf_counter() - t0)
        mine["optimizer_s"].append(sum(clock.seconds(a, b) for a, b in marks))
        mine["moe_s"].append(moe_timer.take())
        mine["loss"].append(float(lm_sum) / gas)
        counts_LE, _, _ = engine.expert_load.collect(None)  # this step's tokens per expert, all ranks
        ratios.append(list(rank_load_ratios(counts_LE.tolist(), rank_ofs, [m.ep_size for m in layers])))
        for report in engine.balance.reports[seen:]:
            windows.append(_window(report, step + 1, rank_ofs, layers, engine.balance.bytes_per_expert))
    seconds = time.perf_counter() - t_run
    moe_timer.remove()
    every: List[Optional[Dict[str, List[float]]]] = [None] * world
    dist.all_gather_object(every, mine)
    reports = engine.balance.reports
    out = {"migration": migration, "ratio_per_step": [sum(r) / len(r) for r in ratios], "ratio_per_layer_step": ratios,
           "ratio_mean": sum(sum(r) / len(r) for r in ratios) / len(ratios),
           "moves": sum(r.moves for r in reports), "bytes_moved": sum(r.bytes_sent for r in reports),
           "migration_s": sum(r.seconds for r in reports), "seconds": seconds, "windows": windows,
           "step_s": [max(v) for v in zip(*(e["step_s"] for e in every))],
           "optimizer_s": [max(v) for v in zip(*(e["optimizer_s"] for e in every))],
           "moe_s_per_rank": [e["moe_s"] for e in every],
           "loss": [sum(v) / world for v in zip(*(e["loss"] for e in every))],
           "tokens_per_step": world * gas * micro * piper.model.seq_len}
    engine.destroy()
    return out


def _window(report, train_step: int, rank_ofs, layers, bytes_per_expert) -> Dict[str, Any]:
    """One balance window's entry: the controller's metrics (without their ``balance/`` prefix), where it ended
    (``step``: applied optimizer steps, as the controller counts; ``train_step``: steps of this run), the
    migration's measured seconds (the mover's wall time on the slowest rank) and what the controller's planner
    predicted for it (the sum of its layers' transfer costs at ``piper.balance.p2p_gbps``), and per layer with
    swaps what the prediction rests on (the experts its busiest sender sends, bytes per expert)."""
    moved = [{"layer": i, "swaps": len(plan.swaps), "bytes_per_expert": bytes_per_expert[i],
              "max_sent_experts": _max_sent(plan.swaps, rank_ofs[i], layers[i].ep_size), "predicted_s": plan.cost_s}
             for i, plan in enumerate(report.plans) if plan.swaps]
    return {"step": report.step, **{k.split("/", 1)[1]: v for k, v in report.metrics.items()},
            "train_step": train_step, "migration_s": report.seconds,
            "predicted_s": sum(m["predicted_s"] for m in moved), "layers": moved}
