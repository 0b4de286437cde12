"""What every piper_ds engine adds around DeepSpeed's at run time: atomic checkpoints, the heartbeat
watchdog, the divergence guard and the fault-injection point after each optimizer step."""
from __future__ import annotations

from typing import Optional

from piper_ds.runtime.checkpoint import AtomicCheckpoints
from piper_ds.runtime.divergence import DivergenceGuard
from piper_ds.runtime.faults import inject
from piper_ds.runtime.watchdog import Watchdog, start_watchdog


class RuntimeGuards(AtomicCheckpoints):
    """Mixin for DeepSpeed engines (before the DeepSpeed class in the bases). Call :meth:`_setup_runtime` at the
    end of ``__init__`` and :meth:`_after_optimizer_step` after every optimizer step."""

    watchdog: Optional[Watchdog] = None

    def _setup_runtime(self, piper) -> None:
        """``piper``: the parsed ``"piper"`` block (:class:`piper_ds.config.PiperConfig`)."""
        self._setup_atomic_checkpoints(piper.checkpoint)
        self.divergence = DivergenceGuard(piper.runtime.max_skipped_steps)
        if piper.runtime.heartbeat:
            self.watchdog = start_watchdog(piper.runtime.timeout_s)

    def _after_optimizer_step(self, applied: bool) -> None:
        """Fault point ``step:<n>``, then the divergence guard (raises DivergenceError on every rank alike)."""
        inject(f"step:{self.global_steps}")
        self.divergence.observe(self.global_steps, applied, self.get_global_grad_norm())

    def destroy(self):
        """Stops the watchdog (this rank is marked done), then DeepSpeed's destroy."""
        if self.watchdog is not None:
            self.watchdog.stop()
        super().destroy()
