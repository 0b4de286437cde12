"""Pipeline schedules as generators of instructions, in DeepSpeed's ``PipeSchedule`` pattern.

Two levels, both pure logic (no processes, testable on their own):

* **across stages** — which micro-batch a stage runs forward or backward at each step, and the sends and
  receives between neighbouring stages. :class:`OneFOneB` is DeepSpeed's ``TrainSchedule`` (1F1B).
  :class:`OverlapSchedule` is the same 1F1B order whose compute instructions are
  :class:`OverlapForwardPass` / :class:`OverlapBackwardPass`: the stage runs its micro-batch as two halves;
* **inside a stage** — :func:`half_program` is the order in which the stage's layers run on the two halves:
  ``(half 0, layer 0), (half 1, layer 0), (half 0, layer 1), ...``. Each half has its own CUDA stream, so
  while half 0's MoE dispatch/combine all-to-all of layer ``l`` is on the wire, half 1's attention or expert
  compute of the same layer runs beside it, and the other way round. Autograd replays the interleave in
  backward (the halves' nodes alternate by creation order, each on its forward stream).

:func:`piper_ds.pipeline.simulator.simulate` executes the schedules of all ranks against each other, with a
clock: deadlocks, unmatched sends, data-dependency errors, and each schedule's bubble.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple, Type

from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.schedule import BackwardPass, BufferOpInstruction, ForwardPass, PipeSchedule, TrainSchedule

from piper_ds.system.pipeline import check_schedule


class OverlapForwardPass(BufferOpInstruction):
    """Forward of the micro-batch in ``buffer_id`` as two halves on two streams (see :func:`half_program`)."""


class OverlapBackwardPass(BufferOpInstruction):
    """Backward of the micro-batch in ``buffer_id``, whose forward ran as :class:`OverlapForwardPass`."""


class OneFOneB(TrainSchedule):
    """DeepSpeed's synchronous 1F1B ``TrainSchedule``, the baseline (one buffer per in-flight micro-batch)."""


class OverlapSchedule(TrainSchedule):
    """1F1B across stages; each forward/backward runs the micro-batch as two halves whose MoE all-to-alls
    overlap the other half's compute. Needs an even micro-batch size (checked by the engine)."""

    _SWAP: Dict[type, Type[BufferOpInstruction]] = {ForwardPass: OverlapForwardPass,
                                                     BackwardPass: OverlapBackwardPass}

    def steps(self) -> Iterator[List[ds_schedule.PipeInstruction]]:
        for cmds in super().steps():
            yield [self._SWAP[type(c)](c.buffer_id) if type(c) in self._SWAP else c for c in cmds]


class DualPipeV(ds_schedule.DualPipeVSchedule):
    """DeepSpeed's DualPipeV schedule (DeepSeek-V3's): two virtual stages per pipeline rank, micro-batches out
    through the phase-0 stages and back through the phase-1 stages; needs micro_batches >= 2 x stages. Its
    sends and receives carry a ``phase`` and complete at the next ``CommitP2P``
    (:func:`piper_ds.pipeline.simulator.simulate` models both)."""


#: The schedule class of every name of :data:`piper_ds.system.pipeline.SCHEDULE_STAGES`.
SCHEDULES: Dict[str, Type[PipeSchedule]] = {"1f1b": OneFOneB, "overlap": OverlapSchedule, "dualpipev": DualPipeV}


def make_schedule(name: str, micro_batches: int, stages: int, stage_id: int) -> PipeSchedule:
    """The training schedule ``name`` ('1f1b' | 'overlap' | 'dualpipev') for one stage; ValueError naming bad
    values."""
    check_schedule(name)
    if micro_batches < 1 or stages < 1 or not 0 <= stage_id < stages:
        raise ValueError(f"bad schedule shape: micro_batches={micro_batches}, stages={stages}, "
                         f"stage_id={stage_id}")
    return SCHEDULES[name](micro_batches=micro_batches, stages=stages, stage_id=stage_id)


def half_program(num_layers: int, halves: int = 2) -> Iterator[Tuple[int, int]]:
    """The intra-stage order ``(half, local layer)``: layer-major, halves alternating.

    Invariants (tested): each half visits its layers in order; consecutive entries of the same layer belong
    to different halves, so one half's all-to-all always has the other half's compute issued beside it.
    """
    if num_layers < 0 or halves < 1:
        raise ValueError(f"half_program needs num_layers >= 0 and halves >= 1, got {num_layers}, {halves}")
    for layer in range(num_layers):
        for half in range(halves):
            yield half, layer
