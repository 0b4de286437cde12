"""Human output of a plan: the ranked table, the detail of the chosen layout, its expert-migration cost, and
PNG plots."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from rich.console import Console
from rich.table import Table

from piper_ds.planner.cluster import GIB
from piper_ds.planner.memory import KINDS
from piper_ds.planner.migration import MigrationCost, migration_cost
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.resources import STEP_PARTS, Estimate


def _ms(x: float) -> str:
    return f"{x * 1e3:,.1f}"


def ranked_table(ests: Sequence[Estimate], top: int = 10) -> Table:
    """The top ``top`` layouts with throughput, MFU, step breakdown (ms) and worst-stage memory (GiB)."""
    t = Table(title=f"Top {min(top, len(ests))} of {len(ests)} feasible layouts (ranked by predicted tokens/s)")
    for col in ("#", "pp", "dp", "ep", "ZeRO", "micro x accum", "ckpt", "a2a", "tokens/s", "tok/s/GPU",
                "TFLOP/s/GPU", "MFU", "step ms", "compute / a2a / p2p / bubble / sync+opt ms",
                "worst stage GiB", "states / act / other GiB"):
        t.add_column(col, justify="right" if col not in ("a2a", "ckpt") else "left")
    for i, e in enumerate(ests[:top], 1):
        lay, p, w = e.layout, e.step_parts, e.worst
        states = sum(w.kinds[k] for k in ("weights", "grads", "optimizer"))
        other = w.total - states - w.kinds["activations"]
        t.add_row(str(i), str(lay.pp), str(lay.dp), str(lay.ep), str(lay.zero_stage),
                  f"{lay.micro_batch} x {lay.grad_accum}", "yes" if lay.activation_checkpointing else "no",
                  lay.a2a + {"1f1b": "", "overlap": " +ovl", "dualpipev": " +dualpipev"}[lay.schedule],
                  f"{e.tokens_per_s:,.0f}",
                  f"{e.tokens_per_s / lay.gpus:,.0f}", f"{e.tflops_per_gpu:.1f}", f"{100 * e.mfu:.1f}%",
                  _ms(e.step_time),
                  " / ".join(_ms(p[k]) for k in ("compute", "a2a", "p2p", "bubble"))
                  + f" / {_ms(p['grad_sync'] + p['optimizer'])}",
                  f"{w.total / GIB:.1f} (s{w.stage})",
                  f"{states / GIB:.1f} / {w.kinds['activations'] / GIB:.1f} / {other / GIB:.1f}")
    return t


def detail_tables(e: Estimate) -> List[Table]:
    """Memory per stage by kind (GiB) and the step-time breakdown (ms, share) of one estimate."""
    mem = Table(title=f"Memory per stage, GiB per GPU (HBM {e.cluster.hbm_gib:.1f} GiB) - {e.layout.short()}")
    mem.add_column("stage")
    mem.add_column("blocks")
    mem.add_column("in flight", justify="right")
    for k in KINDS:
        mem.add_column(k, justify="right")
    mem.add_column("total", justify="right")
    for m in e.memory:
        mem.add_row(str(m.stage), ", ".join(f"{b.start}-{b.stop - 1}" for b in m.blocks), str(m.in_flight),
                    *[f"{m.kinds[k] / GIB:.2f}" for k in KINDS], f"{m.total / GIB:.2f}")
    step = Table(title=f"Step time breakdown ({_ms(e.step_time)} ms per step)")
    step.add_column("part")
    step.add_column("ms", justify="right")
    step.add_column("share", justify="right")
    for k in STEP_PARTS:
        step.add_row(k, _ms(e.step_parts[k]), f"{100 * e.step_parts[k] / e.step_time:.1f}%")
    step.add_row("(a2a hidden)", _ms(e.a2a_hidden), "")
    return [mem, step]


def migration_table(cost: MigrationCost) -> Table:
    """One MoE layer's expert-migration cost (bytes per expert, one swap's time) and break-even imbalance."""
    t = Table(title=f"Expert migration per MoE layer ({cost.moe_layers} layers; piper.balance window "
                    f"{cost.window} steps)")
    for col in ("params / expert", "bytes / expert (Table IV)", "sent / expert after a step", "EP link",
                "swap ms", "layer MoE ms / step", "break-even max/mean"):
        t.add_column(col, justify="left" if col == "EP link" else "right")
    t.add_row(f"{cost.expert_params / 1e6:,.2f} M", f"{cost.table_iv_bytes / 2**20:,.1f} MiB",
              f"{cost.sent_bytes / 2**20:,.1f} MiB", f"{cost.link} {cost.link_gbps:g} GB/s",
              _ms(cost.swap_seconds), _ms(cost.layer_seconds), f"1 + {cost.break_even - 1:.2g}")
    return t


def print_plan(console: Console, ests: Sequence[Estimate], top: int,
               profile: Optional[PlatformProfile] = None) -> None:
    """Prints the ranked table, the detail of the first layout and its expert-migration cost."""
    console.print(ranked_table(ests, top))
    for t in detail_tables(ests[0]):
        console.print(t)
    e = ests[0]
    cost = migration_cost(e.model, e.cluster, e.layout, profile)
    if cost is None:
        console.print("expert migration: none possible at ep = 1 (every rank holds every expert)")
    else:
        console.print(migration_table(cost))


def _save(plt, fig, ax, path: str) -> str:
    """Legend outside the axes, tight layout, PNG at 120 dpi; closes the figure and returns ``path``."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_plan(ests: Sequence[Estimate], out_dir: str, top: int = 10) -> List[str]:
    """Writes memory_per_stage.png (chosen layout, stacked by kind) and step_breakdown.png (top layouts);
    returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    e = ests[0]
    fig, ax = plt.subplots(figsize=(max(6.5, 2.5 + 0.6 * len(e.memory)), 4))
    bottom = [0.0] * len(e.memory)
    xs = [m.stage for m in e.memory]
    for k in KINDS:
        vals = [m.kinds[k] / GIB for m in e.memory]
        ax.bar(xs, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(e.cluster.hbm_gib, color="k", linestyle="--", label=f"HBM {e.cluster.hbm_gib:.0f} GiB")
    ax.set_xlabel("pipeline stage")
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"Memory per stage: {e.model.name}, {e.layout.short()}")
    mem_path = _save(plt, fig, ax, os.path.join(out_dir, "memory_per_stage.png"))

    shown = list(ests[:top])
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * len(shown)))
    left = [0.0] * len(shown)
    labels = [x.layout.short() for x in shown]
    for k in STEP_PARTS:
        vals = [x.step_parts[k] * 1e3 for x in shown]
        ax.barh(labels, vals, left=left, label=k)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per step")
    ax.set_title(f"Step time breakdown: {e.model.name} on {e.layout.gpus} GPUs ({e.cluster.name})")
    step_path = _save(plt, fig, ax, os.path.join(out_dir, "step_breakdown.png"))
    return [mem_path, step_path]
