"""The fused ZeRO-1/2 optimizer step: DeepSpeed's stage 1/2 optimizer, each partition updated in one pass.

DeepSpeed's ``DeepSpeedZeroOptimizer.step`` makes five passes over every parameter of a partition after the
backward: it flattens the low-precision gradients, copies them to a new fp32 buffer, multiplies that by the
clip coefficient, runs the basic optimizer over the fp32 master weights, and copies the master back into the
low-precision weights (and the gradient norm before it copies every gradient to fp64). On one H200 that is
about half of a 4-billion-parameter MoE model's training step. :class:`FusedStepZeroOptimizer` keeps
everything DeepSpeed owns (partitioning, reduction, overflow handling, all-gather, checkpoints, the optimizer
state in torch's format) and replaces the per-partition update with :func:`piper_ds.ops.adamw.adamw_step`:
one launch per gradient tensor that reads the bf16 gradient, folds in the clip coefficient, updates the fp32
master and moments, and writes the bf16 weights, with no host wait. The gradient norm accumulates in fp32
straight from the bf16 gradients (DeepSpeed's in fp64 from an fp64 copy): the clip coefficient differs in
about the 7th significant digit. Where the norm is computed, it also serves as DeepSpeed's overflow check (a
non-finite gradient makes it non-finite), so the step makes one pass over the gradients before the update and
waits for the host once; a step it finds non-finite is handed to DeepSpeed's own step, which decides.

Supported: torch.optim.Adam / AdamW (a ds_config with ``"torch_adam": true``, as the planner writes it), bf16 or
fp32 training, ZeRO stage 1 or 2 without offload. Anything else keeps DeepSpeed's step; :func:`fused_step_blocker`
names the reason. The result equals DeepSpeed's step bit for bit on the CPU without clipping, and to the norm's
rounding with it (tests/test_zero_fused_step.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from deepspeed import comm as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import (all_gather_dp_groups, is_invalid_grad_norm, is_model_parallel_parameter,
                                     mask_nan_or_inf_with_val_inplace)
from deepspeed.runtime.zero.stage_1_and_2 import (INITIAL_MICRO_STEP_ID, OPTIMIZER_ALLGATHER_TIMER,
                                                  OPTIMIZER_STEP_TIMER, OPTIMIZER_TIMERS, DeepSpeedZeroOptimizer)
from deepspeed.utils import log_dist

from piper_ds.ops.adamw import adamw_step

__all__ = ["FusedStepZeroOptimizer", "fused_step_blocker", "adopt_fused_step", "FUSED_STEP_MODES"]

#: ``piper.optimizer.fused_step``: "auto" (fused where supported, else DeepSpeed's step with a log line naming
#: why), "on" (fused or a ValueError naming what stands in the way), "off" (DeepSpeed's step).
FUSED_STEP_MODES = ("auto", "on", "off")


def _group_blocker(group: dict) -> Optional[str]:
    for option in ("amsgrad", "maximize", "capturable", "differentiable"):
        if group.get(option, False):
            return f"the optimizer's {option}=True"
    for name in ("lr", "eps", "weight_decay"):
        if isinstance(group.get(name), torch.Tensor):
            return f"a tensor {name}"
    if any(isinstance(b, torch.Tensor) for b in group.get("betas", ())):
        return "tensor betas"
    return None


def fused_step_blocker(zero: DeepSpeedZeroOptimizer) -> Optional[str]:
    """Why ``zero`` (a ZeRO stage 1/2 optimizer DeepSpeed built) cannot take the fused step, or None if it can."""
    if type(zero) is not DeepSpeedZeroOptimizer:
        return f"the ZeRO optimizer is {type(zero).__name__}, not DeepSpeedZeroOptimizer (ZenFlow?)"
    if zero.cpu_offload:
        return "optimizer offload is on"
    if zero.torch_autocast_gradscaler is not None:
        return "torch autocast's grad scaler is on"
    if zero.dtype not in (torch.bfloat16, torch.float32):
        return f"the model trains in {zero.dtype} (fp16 keeps DeepSpeed's loss-scaled step)"
    if zero.gradient_accumulation_dtype not in (zero.dtype, torch.float32):
        return f"gradients accumulate in {zero.gradient_accumulation_dtype}"
    if type(zero.optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return (f"the basic optimizer is {type(zero.optimizer).__name__} (the fused step runs torch.optim.Adam / "
                "AdamW: set \"torch_adam\": true in the ds_config's optimizer params)")
    if zero.clip_grad > 0 and not zero.compute_grad_norm:
        return "gradient clipping is on but the gradient norm is not computed"
    if len(zero.optimizer.param_groups) != len(zero.bit16_groups):
        return "the optimizer's param groups do not match ZeRO's"
    for i, group in enumerate(zero.optimizer.param_groups):
        master = zero.single_partition_of_fp32_groups[i]
        if len(group["params"]) != 1 or group["params"][0] is not master or master.dtype != torch.float32:
            return f"param group {i} is not one fp32 master partition"
        reason = _group_blocker(group)
        if reason is not None:
            return reason
    return None


class FusedStepZeroOptimizer(DeepSpeedZeroOptimizer):
    """``DeepSpeedZeroOptimizer`` whose ``step`` updates each partition with :func:`adamw_step`.

    Not constructed: :func:`adopt_fused_step` turns an optimizer that DeepSpeed's engine built into one (its
    class is reassigned), so the engine's long construction of the ZeRO optimizer stays DeepSpeed's own. Only
    the non-skipped step changes; a step with an overflow or a non-finite norm (where DeepSpeed checks for them)
    is DeepSpeed's.
    """

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        """DeepSpeed's L2 gradient norm of a partition (padding and pipeline-replicated parameters skipped, sums
        over the data- and model-parallel groups), accumulated in fp32 from the gradients as they are."""
        if float(norm_type) != 2.0:
            return super().get_grad_norm_direct(gradients, params, norm_type)
        real = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        kept, left_out = [], []
        for g, p in zip(real, params):
            counted = not getattr(p, PIPE_REPLICATED, False) and (is_model_parallel_parameter(p)
                                                                  or self.model_parallel_rank == 0)
            (kept if counted else left_out).append(g)
        if kept:
            total = torch.stack(torch._foreach_norm(kept, 2.0, dtype=torch.float32)).pow(2).sum()
        else:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.check_grad_overflow and left_out:
            # step() takes DeepSpeed's overflow check from this norm: a non-finite gradient it does not count
            # must still make it non-finite (0 * inf and 0 * nan are nan)
            total = total + 0.0 * torch.stack(torch._foreach_norm(left_out, 2.0, dtype=torch.float32)).sum()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total

    def _grad_multiplier(self, norm: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """1 / DeepSpeed's combined scale (loss scale times the clip coefficient), computed on the device; None
        when it is 1. A non-finite or negative norm gives 0, as DeepSpeed's clipping does."""
        if self.clip_grad <= 0.0:
            if self.loss_scale == 1.0:
                return None
            return torch.full((), 1.0 / self.loss_scale, dtype=torch.float32, device=self.device)
        invalid = ~torch.isfinite(norm) | (norm < 0)
        clip_norm = torch.where(invalid, torch.full_like(norm, float("inf")), norm)
        clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        return (1.0 / (clip * self.loss_scale)).to(torch.float32)

    def _partition_grads(self, i: int) -> List[torch.Tensor]:
        """The gradients of partition ``i`` laid end to end from its first element (one flat tensor when
        DeepSpeed keeps them in one); :func:`adamw_step` checks they fit the partition's master."""
        flat = self._get_preflattened_grad_partition(i)
        return [flat] if flat is not None else list(self.averaged_gradients[i])

    def _state_of(self, master: torch.Tensor, group: dict) -> dict:
        """torch.optim.Adam's state of ``master``, created as torch creates it (step on the device for fused or
        capturable groups, else on the CPU)."""
        state = self.optimizer.state[master]
        if not state:
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            on_device = group.get("fused") or group.get("capturable")
            state["step"] = (torch.zeros((), dtype=scalar, device=master.device) if on_device
                             else torch.tensor(0.0, dtype=scalar))
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """DeepSpeed's ZeRO step with one fused Adam(W) pass per gradient tensor in place of the flatten, fp32
        copy, clip, basic-optimizer step and copy back. ``closure`` is not supported (as DeepSpeed's)."""
        self.micro_step_id = INITIAL_MICRO_STEP_ID
        if not self.compute_grad_norm:
            self._global_grad_norm = None
        self.overflow = False
        if self.check_grad_overflow and not self.compute_grad_norm:
            self.check_overflow(partition_gradients=self.partition_gradients)
        norm = None
        if self.compute_grad_norm and not self.overflow:
            norm = self.scaled_global_norm()
            # The one host wait of a step, and only where DeepSpeed waits too (fp32, or bf16 with the check on).
            # It stands in for DeepSpeed's overflow check as well: any non-finite gradient of the partition makes
            # the norm non-finite (get_grad_norm_direct), and that check's two reductions and ten small launches
            # per gradient tensor, and its own host wait, are the largest host cost of DeepSpeed's step.
            if (self.dtype != torch.bfloat16 or self.check_grad_overflow) and is_invalid_grad_norm(norm):
                self.overflow = True
        if self.overflow:
            # DeepSpeed's step runs its own overflow check and norm: it updates the loss scale and drops the
            # gradients, or (a finite norm that overflowed only in fp32) takes the step as it would have
            return super().step(closure)

        prev_scale = self.loss_scale
        self._update_scale(False)
        if norm is not None:
            self._global_grad_norm = norm / prev_scale
        multiplier = self._grad_multiplier(norm)

        self.timers(OPTIMIZER_STEP_TIMER).start()
        for i, group in enumerate(self.optimizer.param_groups):
            partition_id = dist.get_rank(group=self.real_dp_process_group[i])
            self.free_grad_in_param_list(self.params_not_in_partition[i])
            master = self.single_partition_of_fp32_groups[i]
            state = self._state_of(master, group)
            state["step"] += 1
            adamw_step(self._partition_grads(i), master, state["exp_avg"], state["exp_avg_sq"],
                       self.parallel_partitioned_bit16_groups[i][partition_id], step=state["step"], lr=group["lr"],
                       betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                       decoupled=group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW)),
                       grad_multiplier=multiplier)
            self.free_grad_in_param_list(self.params_in_partition[i])
            self._release_preflattened_grad_buffers(i)
            self.averaged_gradients[i] = None
            self.all_grad_tensors[i] = None
        # torch's LR schedulers warn when their optimizer's step() never ran; this step is that step
        self.optimizer._opt_called = True
        self._lazy_init_hp_params_optimizer_state()
        self.timers(OPTIMIZER_STEP_TIMER).stop()

        self.timers(OPTIMIZER_ALLGATHER_TIMER).start()
        all_gather_dp_groups(groups_flat=self.bit16_groups_flat,
                             partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                             dp_process_group=self.real_dp_process_group,
                             start_alignment_factor=self.nccl_start_alignment_factor,
                             allgather_bucket_size=self.allgather_bucket_size)
        self.timers(OPTIMIZER_ALLGATHER_TIMER).stop()
        for i in range(len(self.bit16_groups)):
            self._update_model_bit16_weights(i)
        self.timers.log(OPTIMIZER_TIMERS)


def adopt_fused_step(zero, mode: str):
    """Returns ``zero`` (what DeepSpeed's ``_configure_zero_optimizer`` built) turned into a
    :class:`FusedStepZeroOptimizer` when ``mode`` allows and the setup supports it, else unchanged.

    ``mode``: one of :data:`FUSED_STEP_MODES`. "on" with an unsupported setup is a ValueError naming the reason;
    "auto" logs the reason on rank 0 and keeps DeepSpeed's step. ZeRO stage 3 optimizers pass through.
    """
    if mode not in FUSED_STEP_MODES:
        raise ValueError(f"piper.optimizer.fused_step must be one of {FUSED_STEP_MODES}, got {mode!r}")
    if mode == "off":
        return zero
    reason = (fused_step_blocker(zero) if isinstance(zero, DeepSpeedZeroOptimizer)
              else f"the optimizer is {type(zero).__name__} (the fused step serves ZeRO stages 1 and 2)")
    if reason is None:
        zero.__class__ = FusedStepZeroOptimizer
        log_dist("piper_ds: fused ZeRO step (one Adam(W) pass per gradient tensor)", ranks=[0])
        return zero
    if mode == "on":
        raise ValueError(f"piper.optimizer.fused_step is 'on' but {reason}")
    log_dist(f"piper_ds: DeepSpeed's ZeRO step ({reason})", ranks=[0])
    return zero


class FusedZeroStep:
    """Mixin for DeepSpeed engines (before the DeepSpeed class in the bases): the ZeRO stage 1/2 optimizer the
    engine builds takes the fused step as ``self.piper_config.optimizer.fused_step`` says (set the attribute
    before ``DeepSpeedEngine.__init__``)."""

    def _configure_zero_optimizer(self, optimizer):
        return adopt_fused_step(super()._configure_zero_optimizer(optimizer), self.piper_config.optimizer.fused_step)

    def _configure_optimizer(self, client_optimizer, model_parameters):
        """DeepSpeed's; then "on" without a fused step (ZeRO stage 0 builds no ZeRO optimizer) is a ValueError."""
        super()._configure_optimizer(client_optimizer, model_parameters)
        if self.piper_config.optimizer.fused_step == "on" and not isinstance(self.optimizer, FusedStepZeroOptimizer):
            raise ValueError(f"piper.optimizer.fused_step is 'on' but the engine runs "
                             f"{type(self.optimizer).__name__} (the fused step needs ZeRO stage 1 or 2, got "
                             f"stage {self.zero_optimization_stage()})")
