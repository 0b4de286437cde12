"""Metrics: throughput and analytic MFU, expert load per MoE layer, writers through DeepSpeed's monitor."""
from piper_ds.tracking.expert_load import ExpertLoadCounter, mean_router_losses
from piper_ds.tracking.monitor import log_config_to_wandb, log_expert_histograms, write_scalars
from piper_ds.tracking.throughput import Throughput, peak_memory_gb, synchronize

__all__ = ["ExpertLoadCounter", "mean_router_losses", "Throughput", "peak_memory_gb", "synchronize", "write_scalars",
           "log_expert_histograms", "log_config_to_wandb"]
