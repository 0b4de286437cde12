"""The divergence guard: counts skipped optimizer steps and stops a run after too many in a row.

A step counts as skipped when DeepSpeed did not apply it (its overflow check found non-finite gradients, or
fp16 loss scaling overflowed) or when its global gradient norm is not finite (paths that apply such a step,
e.g. ZeRO-0 in fp32 or bf16 without overflow checks). Both signals are the same on every rank, so every rank
stops at the same step.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch


class DivergenceError(RuntimeError):
    """Raised on every rank when ``max_skipped_steps`` consecutive optimizer steps were skipped."""


class DivergenceGuard:
    """Counts skipped optimizer steps (in total and in the current streak) and raises :class:`DivergenceError`
    when the streak reaches ``max_skipped`` (0 = never).

    A gradient norm that is a device tensor is read at the next :meth:`observe` or :meth:`flush`, one step
    late, when the device has finished computing it: the guard never waits for the device.
    """

    def __init__(self, max_skipped: int):
        if not isinstance(max_skipped, int) or max_skipped < 0:
            raise ValueError(f"max_skipped must be an int >= 0, got {max_skipped!r}")
        self.max_skipped = max_skipped
        self.skipped = 0  # skipped steps since the guard was built (this run)
        self.streak = 0   # consecutive skipped steps up to the last resolved one
        self.last_step: Optional[int] = None
        self._pending: List[Tuple[int, bool, Any]] = []

    def observe(self, step: int, applied: bool, grad_norm: Any) -> None:
        """Records optimizer step ``step``: whether DeepSpeed applied it and its global gradient norm (float,
        0-d tensor or None when not computed). Raises DivergenceError when the streak reaches the limit."""
        self._pending.append((step, applied, grad_norm))
        ready = self._pending[:-1] if applied and isinstance(grad_norm, torch.Tensor) else self._pending
        self._pending = self._pending[len(ready):]
        for item in ready:
            self._resolve(*item)

    def flush(self) -> None:
        """Resolves a step whose gradient norm is still on the device (waits for it)."""
        pending, self._pending = self._pending, []
        for item in pending:
            self._resolve(*item)

    def _resolve(self, step: int, applied: bool, grad_norm: Any) -> None:
        norm = float(grad_norm) if grad_norm is not None else None
        bad = not applied or (norm is not None and not math.isfinite(norm))
        self.last_step = step
        self.skipped += bad
        self.streak = self.streak + 1 if bad else 0
        if self.max_skipped and self.streak >= self.max_skipped:
            raise DivergenceError(
                f"training diverged: the last {self.streak} optimizer steps (up to step {step}) were skipped "
                f"(non-finite gradients; last gradient norm {norm}), {self.skipped} skipped in this run; stopping "
                f"(piper.runtime.max_skipped_steps = {self.max_skipped}). The last checkpoint is left as it was: "
                "lower the learning rate (or raise the warm-up) and resume from it.")
