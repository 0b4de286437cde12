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

:func:`simulate` executes the schedules of all stages against each other (blocking point-to-point, as in
DeepSpeed's p2p) and reports deadlocks, unmatched sends and forward/backward order violations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple, Type

from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.schedule import (BackwardPass, BufferOpInstruction, ForwardPass, LoadMicroBatch,
                                             OptimizerStep, PipeSchedule, RecvActivation, RecvGrad, ReduceGrads,
                                             ReduceTiedGrads, SendActivation, SendGrad, TrainSchedule)


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
    sends and receives carry a ``phase`` and complete at the next ``CommitP2P``, which :func:`simulate` does not
    model: DeepSpeed tests the schedule, our multi-process tests run it."""


SCHEDULES: Dict[str, Type[PipeSchedule]] = {"1f1b": OneFOneB, "overlap": OverlapSchedule, "dualpipev": DualPipeV}


def make_schedule(name: str, micro_batches: int, stages: int, stage_id: int) -> PipeSchedule:
    """The training schedule ``name`` ('1f1b' | 'overlap' | 'dualpipev') for one stage; ValueError naming bad
    values."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; known: {sorted(SCHEDULES)}")
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


# ------------------------------------------------------------------------------------------ simulation
FORWARDS = (ForwardPass, OverlapForwardPass)
BACKWARDS = (BackwardPass, OverlapBackwardPass)
_PAIRS = {SendActivation: (RecvActivation, +1), SendGrad: (RecvGrad, -1)}


@dataclass
class SimResult:
    """What :func:`simulate` found. ``events``: per stage, ``(kind, micro_batch)`` in execution order with
    kind in {'F', 'B'}; ``ticks``: rounds until every stage finished."""

    events: List[List[Tuple[str, int]]] = field(default_factory=list)
    ticks: int = 0
    messages: List[Tuple[str, int, int, int]] = field(default_factory=list)  # (kind, src, dst, micro_batch)


def _flatten(sched: PipeSchedule) -> List[ds_schedule.PipeInstruction]:
    return [cmd for step in sched for cmd in step]


def simulate(schedules: Sequence[PipeSchedule], max_ticks: int = 100_000) -> SimResult:
    """Runs every stage's instruction stream with blocking sends/receives (a send completes only together
    with the matching receive on the neighbour). Raises RuntimeError on a deadlock, on a send whose partner
    expects another kind or micro-batch, on a backward before its forward, or on a micro-batch that never
    ran forward and backward on every stage. ValueError for DualPipeV schedules (phased sends completing at
    ``CommitP2P``: not modelled here)."""
    if any(isinstance(s, ds_schedule.DualPipeVSchedule) for s in schedules):
        raise ValueError("simulate models 1F1B-style schedules (blocking neighbour sends); DualPipeV's phased, "
                         "batched sends are not modelled")
    n = len(schedules)
    progs = [_flatten(s) for s in schedules]
    pc = [0] * n
    buf_mb: List[Dict[int, int]] = [dict() for _ in range(n)]  # buffer -> micro-batch it holds
    next_fwd = [0] * n
    inbox: List[Dict[str, List[int]]] = [{"act": [], "grad": []} for _ in range(n)]
    res = SimResult(events=[[] for _ in range(n)])
    for tick in range(max_ticks):
        if all(pc[s] == len(progs[s]) for s in range(n)):
            res.ticks = tick
            break
        progressed = False
        for s in range(n):
            while pc[s] < len(progs[s]):
                cmd = progs[s][pc[s]]
                if not _try_exec(s, cmd, n, progs, pc, buf_mb, next_fwd, inbox, res):
                    break
                pc[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: repr(progs[s][pc[s]]) for s in range(n) if pc[s] < len(progs[s])}
            raise RuntimeError(f"deadlock at tick {tick}: stages blocked at {stuck}")
    else:
        raise RuntimeError(f"schedule did not finish within {max_ticks} ticks")
    _check_complete(schedules, res)
    return res


def _try_exec(s, cmd, n, progs, pc, buf_mb, next_fwd, inbox, res) -> bool:
    """Executes ``cmd`` on stage ``s`` if it can run now; False if it must wait for a partner."""
    kind = type(cmd)
    if kind in _PAIRS:
        want, step = _PAIRS[kind]
        peer = s + step
        if not 0 <= peer < n:
            raise RuntimeError(f"stage {s} sends {kind.__name__} to stage {peer}, which does not exist")
        if pc[peer] >= len(progs[peer]) or type(progs[peer][pc[peer]]) is not want:
            return False  # blocking rendezvous: the partner must be at the matching receive
        mb = buf_mb[s].get(cmd.buffer_id)
        if mb is None:
            raise RuntimeError(f"stage {s} sends {kind.__name__} from empty buffer {cmd.buffer_id}")
        box = "act" if kind is SendActivation else "grad"
        inbox[peer][box].append(mb)
        res.messages.append((box, s, peer, mb))
        if kind is SendGrad:
            del buf_mb[s][cmd.buffer_id]
        pc[peer] += 1  # the partner's receive completes together with the send
        _receive(peer, progs[peer][pc[peer] - 1], buf_mb, inbox)
        return True
    if kind in (RecvActivation, RecvGrad):
        return False  # completes only through the partner's send
    if kind is LoadMicroBatch and s == 0:
        buf_mb[s][cmd.buffer_id] = next_fwd[s]
    elif kind in FORWARDS:
        mb = buf_mb[s].get(cmd.buffer_id, next_fwd[s])
        if mb != next_fwd[s]:
            raise RuntimeError(f"stage {s} runs forward of micro-batch {mb}, expected {next_fwd[s]}")
        buf_mb[s][cmd.buffer_id] = mb
        next_fwd[s] += 1
        res.events[s].append(("F", mb))
    elif kind in BACKWARDS:
        mb = buf_mb[s].get(cmd.buffer_id)
        if mb is None or ("F", mb) not in res.events[s]:
            raise RuntimeError(f"stage {s} runs backward on buffer {cmd.buffer_id} before its forward")
        res.events[s].append(("B", mb))
        if s == 0:
            del buf_mb[s][cmd.buffer_id]
    return True


def _receive(s, cmd, buf_mb, inbox) -> None:
    if type(cmd) is RecvActivation:
        buf_mb[s][cmd.buffer_id] = inbox[s]["act"].pop(0)
    else:
        mb = inbox[s]["grad"].pop(0)
        if buf_mb[s].get(cmd.buffer_id) != mb:
            raise RuntimeError(f"stage {s} receives the gradient of micro-batch {mb} into buffer "
                               f"{cmd.buffer_id}, which holds micro-batch {buf_mb[s].get(cmd.buffer_id)}")


def _check_complete(schedules: Sequence[PipeSchedule], res: SimResult) -> None:
    m = schedules[0].micro_batches
    for s, events in enumerate(res.events):
        for mb in range(m):
            if events.count(("F", mb)) != 1 or events.count(("B", mb)) != 1:
                raise RuntimeError(f"stage {s}: micro-batch {mb} ran forward {events.count(('F', mb))} and "
                                   f"backward {events.count(('B', mb))} times, expected once each")
        tail = [type(c) for c in _flatten(schedules[s])][-3:]
        if tail != [ReduceTiedGrads, ReduceGrads, OptimizerStep]:
            raise RuntimeError(f"stage {s} does not end with the gradient reductions and the step: {tail}")
