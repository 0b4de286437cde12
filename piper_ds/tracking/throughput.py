"""Step timing, throughput and analytic MFU.

FLOP counters see nothing inside grouped GEMMs and custom kernels, so MFU is analytic: FLOPs per token from
the model spec (``ModelSpec.mfu_flops_per_token``: 6 x active compute parameters + 6 x L x seq x d) times
tokens per second, over the accelerator's peak dense TFLOP/s.
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Dict, List, Optional

import torch


def synchronize() -> None:
    """Waits for queued device work (no-op on CPU) so a wall-clock time covers it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_memory_gb() -> float:
    """Peak memory of this process in GB (1e9 bytes): CUDA max allocated on GPU, else peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


class Throughput:
    """Times optimizer steps and turns them into rates.

    Args:
        tokens_per_step: tokens of one optimizer step over all ranks (train_batch_size x seq_len).
        flops_per_token: training FLOP per token (analytic).
        world_size: ranks sharing the step.
        peak_tflops: peak dense TFLOP/s of one accelerator.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, peak_tflops: float):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.world_size, self.peak_tflops = world_size, peak_tflops
        self.step_times: List[float] = []
        self._window: List[float] = []
        self._t0: Optional[float] = None

    def start(self) -> None:
        """Marks the start of a step (after syncing the device)."""
        synchronize()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Marks the end of the step started by :meth:`start`; returns its seconds."""
        if self._t0 is None:
            raise RuntimeError("Throughput.stop() called without start()")
        synchronize()
        dt = time.perf_counter() - self._t0
        self._t0 = None
        self.step_times.append(dt)
        self._window.append(dt)
        return dt

    def rates(self, seconds_per_step: float) -> Dict[str, float]:
        """tokens_per_s (global), tokens_per_s_per_gpu, tflops_per_gpu, mfu_pct for a step time in seconds."""
        tps = self.tokens_per_step / seconds_per_step
        per_gpu = tps / self.world_size
        tflops = per_gpu * self.flops_per_token / 1e12
        return {"tokens_per_s": tps, "tokens_per_s_per_gpu": per_gpu, "tflops_per_gpu": tflops,
                "mfu_pct": 100.0 * tflops / self.peak_tflops}

    def window(self) -> Dict[str, float]:
        """Rates over the steps since the last call (mean step time), plus ``step_time_s``; {} if none."""
        if not self._window:
            return {}
        mean = sum(self._window) / len(self._window)
        self._window = []
        return {"step_time_s": mean, **self.rates(mean)}

    def summary(self, warmup: int = 0) -> Dict[str, float]:
        """Median over the steps after the first ``warmup``: ``median_step_time_s`` and the rates, plus
        ``peak_memory_gb``. Uses all steps when fewer than ``warmup + 1`` were timed."""
        times = self.step_times[warmup:] or self.step_times
        if not times:
            return {"peak_memory_gb": peak_memory_gb()}
        med = statistics.median(times)
        return {"median_step_time_s": med, "steps_timed": len(times), **self.rates(med),
                "peak_memory_gb": peak_memory_gb()}
