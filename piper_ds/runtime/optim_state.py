"""Optimizer state by parameter slice, whatever DeepSpeed's optimizer did with it.

For a trainable parameter (or a range of rows of its first dim, e.g. the slots of a stacked expert parameter)
:func:`optimizer_state` gives one accessor that reads (:meth:`OptimizerState.get`) and writes
(:meth:`OptimizerState.set`) its fp32 master weights, its moments (every state tensor the optimizer keeps per
element: ``exp_avg`` and ``exp_avg_sq`` for Adam) and its step count, under

* ZeRO-0 in fp32: DeepSpeed hands the torch optimizer over as it is; ``optimizer.state[p]`` holds full-shape
  tensors and the parameter is its own master copy (:class:`WholeState`);
* ZeRO-0 with bf16 parameters, which DeepSpeed 0.19 wraps in ``FP16_UnfusedOptimizer`` (torch's Adam: one fp32
  copy per parameter, :class:`WholeState` again) or ``FP16_Optimizer`` (DeepSpeed's fused Adam: one flat fp32
  copy per group, unpartitioned);
* ``BF16_Optimizer`` (DeepSpeed picks it for bf16 under the pipeline engine, and for ZeRO-1 with bf16
  parameters and fp32 gradient accumulation) and ZeRO-1/2 (``DeepSpeedZeroOptimizer``): the parameters of each
  optimizer group are views into one flat low-precision buffer; the buffer is cut into equal partitions over the
  group's data-parallel group (the expert-data-parallel group for expert parameters) and each rank keeps the
  fp32 master copy and the moments of its partition only (:class:`PartitionedState`). A parameter's place in
  the flat buffer is read from its storage offset (where DeepSpeed made it point), so DeepSpeed's reordering and
  alignment padding need no re-derivation.

``get`` is a collective over that data-parallel group when the state is partitioned (each rank contributes the
elements of its partition, one all-reduce); ``set`` writes, on each rank, the elements of its own partition and
the rank's parameter (its low-precision copy; no communication: every rank of the group must call it with the
same values). ZeRO-3 and optimizer offload are refused with a TypeError naming the optimizer.

DeepSpeed internals read (0.19.x): ``BF16_Optimizer.{bf16_groups, bf16_groups_flat, fp32_groups_flat_partition,
real_dp_process_group, optimizer}``, ``DeepSpeedZeroOptimizer.{bit16_groups, bit16_groups_flat,
single_partition_of_fp32_groups, real_dp_process_group, cpu_offload, optimizer}``, ``FP16_Optimizer.{fp16_groups,
fp16_groups_flat, fp32_groups_flat, optimizer}``, ``FP16_UnfusedOptimizer.{fp16_groups, fp32_groups,
optimizer}``; the inner torch optimizer's ``state`` is keyed by the fp32 copy (flat partition, flat group or
per parameter), and partition r of a partitioned group covers elements ``[r * n / dp, (r + 1) * n / dp)`` of its
flat buffer of n elements (a multiple of dp).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

#: A range of rows ``(start, stop)`` of a parameter's first dim, or None for the whole parameter.
Rows = Optional[Tuple[int, int]]


@dataclass
class SliceState:
    """Optimizer state of one parameter slice.

    ``master``: fp32 master weights, the slice's shape. ``moments``: per-element state tensors by the optimizer's
    key (fp32, the slice's shape); empty before the optimizer's first step. ``step``: the step count as the
    optimizer keeps it (a 0-dim tensor for torch's Adam, an int for DeepSpeed's fused Adam); None before the
    first step. The step count is per parameter (per optimizer group when partitioned), not per slice."""

    master: torch.Tensor
    moments: Dict[str, torch.Tensor] = field(default_factory=dict)
    step: Any = None


def step_value(step: Any) -> Optional[float]:
    """The number a :attr:`SliceState.step` holds (None stays None)."""
    return None if step is None else float(step.item() if torch.is_tensor(step) else step)


class OptimizerState(abc.ABC):
    """Reads and writes the optimizer state of parameter slices; made by :func:`optimizer_state`."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @abc.abstractmethod
    def param_group(self, param: torch.nn.Parameter) -> Dict[str, Any]:
        """The torch optimizer's param-group dict that steps ``param`` (its ``lr``, ``betas``, ... apply to it)."""

    @abc.abstractmethod
    def get(self, param: torch.nn.Parameter, rows: Rows = None) -> SliceState:
        """The state of ``param[rows[0]:rows[1]]`` (all of it when ``rows`` is None), as new tensors."""

    @abc.abstractmethod
    def set(self, param: torch.nn.Parameter, state: SliceState, rows: Rows = None) -> None:
        """Writes ``state`` into ``param[rows[0]:rows[1]]``'s fp32 master, moments and step, and the parameter's
        own (possibly low-precision) values from the master. Moments missing from the optimizer are created
        (zeros elsewhere), so a fresh optimizer can be filled."""

    @staticmethod
    def _bounds(param: torch.Tensor, rows: Rows) -> Tuple[int, int, Tuple[int, ...]]:
        """(first element, end element, shape) of the slice in the flattened parameter."""
        if rows is None:
            return 0, param.numel(), tuple(param.shape)
        start, stop = rows
        if param.dim() == 0 or not 0 <= start < stop <= param.shape[0]:
            raise ValueError(f"rows {rows} out of range for a parameter of shape {tuple(param.shape)}")
        per_row = param[0].numel()
        return start * per_row, stop * per_row, (stop - start, *param.shape[1:])

    @staticmethod
    def _check(state: SliceState, shape: Tuple[int, ...]) -> None:
        for name, t in [("master", state.master), *state.moments.items()]:
            if tuple(t.shape) != shape:
                raise ValueError(f"optimizer state {name!r} has shape {tuple(t.shape)}, the slice has {shape}")


def _set_step(state: Dict[str, Any], step: Any, owner: torch.Tensor, group: Dict[str, Any]) -> None:
    """Writes step count ``step`` into ``state``, keeping the type the optimizer already uses; a new entry takes
    ``step``'s type, on ``owner``'s device where torch keeps it there (capturable or fused Adam)."""
    if step is None:
        return
    old = state.get("step")
    if torch.is_tensor(old):
        old.fill_(step_value(step))
    elif old is not None:
        state["step"] = type(old)(step_value(step))
    elif torch.is_tensor(step):
        on_device = group.get("capturable", False) or group.get("fused", False)
        state["step"] = step.detach().clone().to(owner.device if on_device else "cpu")
    else:
        state["step"] = step


class WholeState(OptimizerState):
    """Unpartitioned per-parameter state: the torch optimizer itself (ZeRO-0 in fp32, where a parameter is its
    own master copy) or DeepSpeed's ``FP16_UnfusedOptimizer`` (ZeRO-0 with bf16/fp16 parameters: one fp32 copy
    per parameter, ``fp32_groups[i][j]`` for ``fp16_groups[i][j]``). Full-shape state, no communication."""

    def __init__(self, optimizer, inner: torch.optim.Optimizer, masters: Optional[Dict[int, torch.Tensor]] = None):
        super().__init__(optimizer)
        self.inner, self._masters = inner, masters
        self._group = {id(p): g for g in inner.param_groups for p in g["params"]}

    def _master(self, param) -> torch.Tensor:
        master = param if self._masters is None else self._masters.get(id(param))
        if master is None or id(master) not in self._group:
            raise ValueError(f"parameter of shape {tuple(param.shape)} is not in any optimizer group")
        return master

    def param_group(self, param):
        return self._group[id(self._master(param))]

    @torch.no_grad()
    def get(self, param, rows=None):
        master = self._master(param)
        start, stop, shape = self._bounds(param, rows)
        state = self.inner.state.get(master, {})
        sliced = lambda t: t.detach().reshape(-1)[start:stop].float().clone().reshape(shape)  # noqa: E731
        moments = {k: sliced(v) for k, v in state.items() if torch.is_tensor(v) and v.shape == master.shape}
        step = state.get("step")
        return SliceState(sliced(master), moments, step.clone() if torch.is_tensor(step) else step)

    @torch.no_grad()
    def set(self, param, state, rows=None):
        master = self._master(param)
        start, stop, shape = self._bounds(param, rows)
        self._check(state, shape)
        for target in {id(master): master, id(param): param}.values():  # the master, and the parameter if apart
            target.view(-1)[start:stop].copy_(state.master.reshape(-1))
        slot = self.inner.state[master]
        for key, value in state.moments.items():
            if key not in slot:
                slot[key] = torch.zeros_like(master, memory_format=torch.preserve_format)
            slot[key].view(-1)[start:stop].copy_(value.reshape(-1))
        _set_step(slot, state.step, master, self._group[id(master)])


@dataclass
class _FlatGroup:
    """One optimizer group of a partitioning optimizer: its flat low-precision buffer, this rank's fp32 partition
    (the inner optimizer's parameter), the process group it is partitioned over (None: not partitioned, this
    rank holds the whole group), its index among the groups."""

    flat: torch.Tensor
    partition: torch.Tensor
    process_group: Any
    index: int


class PartitionedState(OptimizerState):
    """BF16_Optimizer and ZeRO-1/2: each rank holds the fp32 master and moments of its partition of every flat
    group; a slice is gathered with one all-reduce over the group's data-parallel group (each element comes from
    the one rank whose partition holds it; the others add zeros) and written back piece by piece."""

    def __init__(self, optimizer, params: List[List[torch.Tensor]], flats: List[torch.Tensor],
                 partitions: List[torch.Tensor], process_groups: List[Any]):
        super().__init__(optimizer)
        self.inner = optimizer.optimizer  # the torch optimizer over the fp32 partitions
        self.groups = [_FlatGroup(*parts, i) for i, parts in enumerate(zip(flats, partitions, process_groups))]
        self._index = {id(p): i for i, group in enumerate(params) for p in group}

    def _locate(self, param) -> Tuple[_FlatGroup, int]:
        """(its flat group, the parameter's first element in the flat buffer), from the parameter's storage."""
        if id(param) not in self._index:
            raise ValueError(f"parameter of shape {tuple(param.shape)} is not in any optimizer group")
        group = self.groups[self._index[id(param)]]
        flat = group.flat
        same_storage = param.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        offset = (param.data_ptr() - flat.data_ptr()) // flat.element_size()
        if not same_storage or param.dtype != flat.dtype or not 0 <= offset <= flat.numel() - param.numel():
            raise ValueError(f"parameter of shape {tuple(param.shape)} does not live in its optimizer group's flat "
                             "buffer (DeepSpeed moved it?): cannot find its optimizer state")
        return group, offset

    def param_group(self, param):
        return self.inner.param_groups[self._locate(param)[0].index]

    def _window(self, group: _FlatGroup, start: int, stop: int) -> Tuple[int, int, int]:
        """Overlap of flat elements [start, stop) with this rank's partition: (first, end, partition start)."""
        import deepspeed.comm as dist
        size = group.partition.numel()
        base = 0 if group.process_group is None else dist.get_rank(group=group.process_group) * size
        return max(start, base), min(stop, base + size), base

    def _moment_keys(self, group: _FlatGroup) -> List[str]:
        state = self.inner.state.get(group.partition, {})
        return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == group.partition.shape)

    @torch.no_grad()
    def get(self, param, rows=None):
        import deepspeed.comm as dist
        group, offset = self._locate(param)
        first, end, shape = self._bounds(param, rows)
        start, stop = offset + first, offset + end
        keys = self._moment_keys(group)
        state = self.inner.state.get(group.partition, {})
        sources = [group.partition] + [state[k] for k in keys]
        buf = torch.zeros(len(sources), stop - start, dtype=torch.float32, device=group.partition.device)
        lo, hi, base = self._window(group, start, stop)
        if lo < hi:
            for row, source in zip(buf, sources):
                row[lo - start:hi - start].copy_(source[lo - base:hi - base])
        if group.process_group is not None and dist.get_world_size(group=group.process_group) > 1:
            dist.all_reduce(buf, group=group.process_group)
        step = state.get("step")
        return SliceState(buf[0].reshape(shape), {k: buf[1 + i].reshape(shape) for i, k in enumerate(keys)},
                          step.clone() if torch.is_tensor(step) else step)

    @torch.no_grad()
    def set(self, param, state, rows=None):
        group, offset = self._locate(param)
        first, end, shape = self._bounds(param, rows)
        self._check(state, shape)
        start, stop = offset + first, offset + end
        param.view(-1)[first:end].copy_(state.master.reshape(-1))  # the low-precision copy every rank holds
        slot = self.inner.state[group.partition]
        for key in state.moments:
            if key not in slot:
                slot[key] = torch.zeros_like(group.partition)
        lo, hi, base = self._window(group, start, stop)
        if lo < hi:
            targets = [(group.partition, state.master)] + [(slot[k], v) for k, v in state.moments.items()]
            for target, value in targets:
                target[lo - base:hi - base].copy_(value.reshape(-1)[lo - start:hi - start])
        _set_step(slot, state.step, group.partition, self.inner.param_groups[group.index])


def optimizer_state(optimizer) -> OptimizerState:
    """The accessor for the optimizer DeepSpeed built (``engine.optimizer``): by its class, once.

    Raises TypeError for optimizers whose state is elsewhere: ZeRO-3, optimizer offload."""
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        if optimizer.cpu_offload:
            raise TypeError("ZeRO-1/2 with optimizer offload keeps the optimizer state on the host: not supported "
                            "(drop zero_optimization.offload_optimizer)")
        return PartitionedState(optimizer, optimizer.bit16_groups, optimizer.bit16_groups_flat,
                                optimizer.single_partition_of_fp32_groups, optimizer.real_dp_process_group)
    if isinstance(optimizer, BF16_Optimizer):
        return PartitionedState(optimizer, optimizer.bf16_groups, optimizer.bf16_groups_flat,
                                optimizer.fp32_groups_flat_partition, optimizer.real_dp_process_group)
    if isinstance(optimizer, FP16_Optimizer):  # flat fp32 masters, not partitioned
        return PartitionedState(optimizer, optimizer.fp16_groups, optimizer.fp16_groups_flat,
                                optimizer.fp32_groups_flat, [None] * len(optimizer.fp16_groups))
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        masters = {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                   for lp, hp in zip(lps, hps)}
        return WholeState(optimizer, optimizer.optimizer, masters)
    if isinstance(optimizer, torch.optim.Optimizer) and not isinstance(optimizer, DeepSpeedOptimizer):
        return WholeState(optimizer, optimizer)
    raise TypeError(f"optimizer state access supports ZeRO-0 and ZeRO-1/2 without offload; got "
                    f"{type(optimizer).__name__} (ZeRO-3 is not supported)")
