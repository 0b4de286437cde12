"""Writing metrics through DeepSpeed's ``MonitorMaster`` (``engine.monitor``), so the ds_config's "wandb",
"csv_monitor" and "tensorboard" blocks work unchanged. Every function is a no-op off rank 0 (DeepSpeed only
creates the writers there)."""
from __future__ import annotations

from typing import Any, Mapping

import torch


def write_scalars(monitor, metrics: Mapping[str, Any], step: int, prefix: str = "Train/Samples/") -> None:
    """One event per scalar in ``metrics`` (None left out), labelled ``prefix + key``, at ``step``. NaN and
    infinity are written as they are: a diverging step must show up in the CSV / W&B / TensorBoard record."""
    if monitor is None or not monitor.enabled:
        return
    events = [(prefix + key, float(value), int(step)) for key, value in metrics.items() if value is not None]
    if events:
        monitor.write_events(events)


def log_expert_histograms(monitor, counts_LE: torch.Tensor, step: int, prefix: str = "Train/ExpertLoad/") -> None:
    """Each MoE layer's tokens per expert as a histogram over expert ids (x: expert id, height: tokens):
    ``wandb.Histogram`` for W&B, ``add_histogram_raw`` for TensorBoard. CSV gets nothing (not a scalar)."""
    if monitor is None or not monitor.enabled:
        return
    num_experts = counts_LE.shape[1]
    edges = torch.arange(num_experts + 1, dtype=torch.float64)
    wandb_monitor = getattr(monitor, "wandb_monitor", None)
    if wandb_monitor is not None:
        import wandb
        data = {f"{prefix}layer_{i}": wandb.Histogram(np_histogram=(row.numpy(), edges.numpy()))
                for i, row in enumerate(counts_LE)}
        wandb_monitor.log(data, step=int(step))
    tb = getattr(monitor, "tb_monitor", None)
    writer = getattr(tb, "summary_writer", None) if tb is not None else None
    if writer is not None:
        ids = torch.arange(num_experts, dtype=torch.float64)
        for i, row in enumerate(counts_LE.double()):
            writer.add_histogram_raw(f"{prefix}layer_{i}", min=0.0, max=float(num_experts - 1),
                                     num=float(row.sum()), sum=float((ids * row).sum()),
                                     sum_squares=float((ids * ids * row).sum()), bucket_limits=edges[1:].tolist(),
                                     bucket_counts=row.tolist(), global_step=int(step))
        writer.flush()


def log_config_to_wandb(monitor, ds_config: Mapping[str, Any]) -> None:
    """Puts the full ds_config (the "piper" block included) into the W&B run config."""
    wandb_monitor = getattr(monitor, "wandb_monitor", None) if monitor is not None else None
    if wandb_monitor is None or not isinstance(ds_config, Mapping):
        return
    import wandb
    if wandb.run is not None:
        wandb.config.update(dict(ds_config), allow_val_change=True)
