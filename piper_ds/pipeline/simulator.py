"""Executes the instruction streams of all pipeline ranks against each other, with a clock: deadlocks,
mismatched sends/receives and data-dependency errors are found without processes, and the bubble of a schedule
comes out of its own instruction order.

Point-to-point semantics follow DeepSpeed's engines:

* 1F1B-style schedules (``TrainSchedule`` and ours): every ``Send*`` / ``Recv*`` is blocking, so it completes
  together with the neighbour's matching instruction;
* DualPipeV: sends and receives carry a ``phase`` (phase 0 flows towards the last rank, phase 1 back) and are
  only queued; the next ``CommitP2P`` launches the queued batch and waits for all of it.

The k-th send on a channel (kind, phase, source, destination) meets the k-th receive. An operation completes at
the later of the two sides' launch times (p2p costs no time here: the bubble is the schedule's own). Forward
and backward instructions cost ``fwd`` / ``bwd`` each (the work of one stage, or of one virtual stage).

Data checks: a forward needs its input (the loaded micro-batch, a received activation, or at DualPipeV's last
rank its own phase-0 output), runs micro-batches in order per (rank, phase), and a backward needs its forward
and its output gradient (the loss, a received gradient, or at DualPipeV's last rank its own phase-1 input
gradient). Every micro-batch must run forward and backward once per (rank, phase).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.schedule import (BackwardPass, CommitP2P, ForwardPass, LoadMicroBatch, OptimizerStep,
                                             PipeSchedule, RecvActivation, RecvGrad, ReduceGrads, ReduceTiedGrads,
                                             SendActivation, SendGrad)

from piper_ds.pipeline.schedules import OverlapBackwardPass, OverlapForwardPass

FORWARDS = (ForwardPass, OverlapForwardPass)
BACKWARDS = (BackwardPass, OverlapBackwardPass)
_P2P = {SendActivation: ("act", "send"), RecvActivation: ("act", "recv"), SendGrad: ("grad", "send"),
        RecvGrad: ("grad", "recv")}


@dataclass
class SimResult:
    """What :func:`simulate` found, per rank. ``events``: ``(kind, micro_batch)`` in execution order, kind 'F' /
    'B' (1F1B-style) or 'F0', 'F1', 'B0', 'B1' (phase 0 / 1 of DualPipeV); ``messages``: ``(kind, src, dst,
    micro_batch)`` with kind 'act' / 'grad' (plus the phase digit under DualPipeV); ``busy``: time spent in
    forward and backward; ``finish``: time of the last instruction; ``makespan``: the latest finish."""

    events: List[List[Tuple[str, int]]] = field(default_factory=list)
    messages: List[Tuple[str, int, int, int]] = field(default_factory=list)
    busy: List[float] = field(default_factory=list)
    finish: List[float] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max(self.finish, default=0.0)

    def bubble_fraction(self) -> float:
        """Mean over ranks of the share of the makespan not spent in forward or backward."""
        if not self.busy or self.makespan <= 0:
            return 0.0
        return sum(1.0 - b / self.makespan for b in self.busy) / len(self.busy)


@dataclass
class _Op:
    channel: Tuple[str, Optional[int], int, int]  # (kind, phase, src, dst)
    side: str  # "send" | "recv"
    buffer: int
    index: int = -1  # position on its channel's side, set when launched
    launched: float = 0.0
    micro_batch: Optional[int] = None  # what travels (set at launch for sends, at matching for receives)


class _Rank:
    def __init__(self, rank: int, program: List[ds_schedule.PipeInstruction]):
        self.rank, self.program, self.pc, self.clock = rank, program, 0, 0.0
        self.queued: List[_Op] = []  # DualPipeV: queued until the next CommitP2P
        self.waiting: Optional[List[_Op]] = None  # launched batch not yet matched
        self.act: Dict[int, int] = {}  # buffer -> micro-batch of the activation it holds
        self.grad: Dict[int, int] = {}  # buffer -> micro-batch of the output gradient it holds
        self.next_fwd: Dict[Optional[int], int] = {}
        self.done: set = set()  # ("F"/"B", phase, micro_batch)
        self.loads = 0
        self.busy = 0.0


def simulate(schedules: Sequence[PipeSchedule], fwd: float = 1.0, bwd: float = 2.0) -> SimResult:
    """Runs every rank's instruction stream (``schedules[r]`` for rank r). Raises RuntimeError on a deadlock,
    a send whose partner expects another kind, phase or micro-batch, a forward without its input or out of
    order, a backward without its forward or its gradient, or a micro-batch that did not run forward and
    backward exactly once per (rank, phase); ValueError for bad costs."""
    if fwd < 0 or bwd < 0:
        raise ValueError(f"fwd and bwd costs must be >= 0, got {fwd}, {bwd}")
    n = len(schedules)
    m = schedules[0].micro_batches if schedules else 0
    phased = any(isinstance(s, ds_schedule.DualPipeVSchedule) for s in schedules)
    ranks = [_Rank(r, [c for step in s for c in step]) for r, s in enumerate(schedules)]
    channels: Dict[Tuple, Dict[str, List[_Op]]] = {}
    res = SimResult(events=[[] for _ in range(n)])
    sim = _Sim(n, m, phased, fwd, bwd, channels, res)
    while True:
        progressed = sim.launched = False  # a launch without completion is progress too: partners may now match
        for rank in ranks:
            while rank.pc < len(rank.program):
                if not sim.step(rank):
                    break
                progressed = True
        progressed = progressed or sim.launched
        if all(r.pc == len(r.program) for r in ranks):
            break
        if not progressed:
            stuck = {r.rank: repr(r.program[r.pc]) for r in ranks if r.pc < len(r.program)}
            raise RuntimeError(f"deadlock: ranks blocked at {stuck}")
    for r in ranks:
        if r.queued:
            raise RuntimeError(f"rank {r.rank} ends with {len(r.queued)} sends/receives never committed")
    res.busy, res.finish = [r.busy for r in ranks], [r.clock for r in ranks]
    _check_complete(ranks, res, m, phased)
    return res


class _Sim:
    def __init__(self, n, m, phased, fwd, bwd, channels, res):
        self.n, self.m, self.phased, self.fwd, self.bwd = n, m, phased, fwd, bwd
        self.channels, self.res = channels, res
        self.launched = False

    def step(self, r: _Rank) -> bool:
        """Executes ``r``'s next instruction if it can complete now; False if it must wait."""
        cmd = r.program[r.pc]
        kind = type(cmd)
        if r.waiting is not None or kind is CommitP2P or (kind in _P2P and not self.phased):
            if r.waiting is None:  # launch: the queued batch (DualPipeV) or this one blocking operation
                ops = r.queued if kind is CommitP2P else [self._op(r, cmd)]
                r.queued = []
                for op in ops:
                    self._launch(r, op)
                r.waiting, self.launched = ops, True
            if not all(self._matched(op) for op in r.waiting):
                return False
            for op in r.waiting:
                other = self._partner(op)
                r.clock = max(r.clock, op.launched, other.launched)
                if op.side == "recv":
                    self._receive(r, op, other)
            r.waiting = None
        elif kind in _P2P:
            r.queued.append(self._op(r, cmd))
        elif kind is LoadMicroBatch:
            if r.rank == 0:  # the first stage loads inputs; DeepSpeed's last stage loads only labels
                r.act[cmd.buffer_id] = r.loads
                r.loads += 1
        elif kind in FORWARDS:
            self._forward(r, cmd)
        elif kind in BACKWARDS:
            self._backward(r, cmd)
        elif kind not in (ReduceTiedGrads, ReduceGrads, OptimizerStep):
            raise RuntimeError(f"rank {r.rank}: the simulator does not know {kind.__name__}")
        r.pc += 1
        return True

    # ------------------------------------------------------------------------------------------ p2p
    def _op(self, r: _Rank, cmd) -> _Op:
        what, side = _P2P[type(cmd)]
        phase = cmd.kwargs.get("phase")
        downstream = r.rank + (1 if phase in (None, 0) else -1)  # where activations go
        upstream = r.rank - (1 if phase in (None, 0) else -1)
        peer = {("act", "send"): downstream, ("act", "recv"): upstream, ("grad", "send"): upstream,
                ("grad", "recv"): downstream}[(what, side)]
        if not 0 <= peer < self.n:
            raise RuntimeError(f"rank {r.rank}: {type(cmd).__name__} (phase {phase}) to rank {peer}, which does "
                               "not exist")
        src, dst = (r.rank, peer) if side == "send" else (peer, r.rank)
        return _Op((what, phase, src, dst), side, cmd.buffer_id)

    def _launch(self, r: _Rank, op: _Op) -> None:
        sides = self.channels.setdefault(op.channel, {"send": [], "recv": []})
        op.index, op.launched = len(sides[op.side]), r.clock
        if op.side == "send":  # outputs after the buffer's forward; an input gradient after its backward
            what, phase = op.channel[0], op.channel[1]
            mb = r.act.get(op.buffer)
            needed = ("F" if what == "act" else "B", phase, mb)
            if mb is None or needed not in r.done:
                raise RuntimeError(f"rank {r.rank} sends {what} (phase {phase}) from buffer {op.buffer} before "
                                   f"its {'forward' if what == 'act' else 'backward'} ran")
            op.micro_batch = mb
            self.res.messages.append((what + ("" if phase is None else str(phase)), op.channel[2], op.channel[3],
                                      mb))
        sides[op.side].append(op)

    def _partner(self, op: _Op) -> Optional[_Op]:
        other = self.channels.get(op.channel, {}).get("recv" if op.side == "send" else "send", [])
        return other[op.index] if op.index < len(other) else None

    def _matched(self, op: _Op) -> bool:
        return self._partner(op) is not None

    def _receive(self, r: _Rank, op: _Op, send: _Op) -> None:
        mb, (what, phase, _, _) = send.micro_batch, op.channel
        if self.phased and op.buffer != (phase or 0) * self.m + mb:
            raise RuntimeError(f"rank {r.rank} receives {what} of micro-batch {mb} (phase {phase}) into buffer "
                               f"{op.buffer}, the slot of micro-batch {op.buffer % self.m}")
        if what == "act":
            r.act[op.buffer] = mb
        else:
            if r.act.get(op.buffer) != mb:
                raise RuntimeError(f"rank {r.rank} receives the gradient of micro-batch {mb} into buffer "
                                   f"{op.buffer}, which holds micro-batch {r.act.get(op.buffer)}")
            r.grad[op.buffer] = mb

    # -------------------------------------------------------------------------------------- compute
    def _forward(self, r: _Rank, cmd) -> None:
        phase = cmd.kwargs.get("phase")
        expected = r.next_fwd.get(phase, 0)
        if self.phased and phase == 1 and r.rank == self.n - 1:  # the turn-around: its own phase-0 output
            if ("F", 0, expected) not in r.done:
                raise RuntimeError(f"rank {r.rank} runs phase-1 forward of micro-batch {expected} before its "
                                   "phase-0 forward")
            r.act[cmd.buffer_id] = expected
        mb = r.act.get(cmd.buffer_id)
        if mb is None:
            raise RuntimeError(f"rank {r.rank} runs forward (phase {phase}) on buffer {cmd.buffer_id}, which "
                               "holds no input")
        if mb != expected:
            raise RuntimeError(f"rank {r.rank} runs forward (phase {phase}) of micro-batch {mb}, expected "
                               f"{expected}")
        r.next_fwd[phase] = expected + 1
        r.done.add(("F", phase, mb))
        self.res.events[r.rank].append(("F" + ("" if phase is None else str(phase)), mb))
        r.clock += self.fwd
        r.busy += self.fwd

    def _backward(self, r: _Rank, cmd) -> None:
        phase = cmd.kwargs.get("phase")
        mb = r.act.get(cmd.buffer_id)
        if mb is None or ("F", phase, mb) not in r.done:
            raise RuntimeError(f"rank {r.rank} runs backward (phase {phase}) on buffer {cmd.buffer_id} before "
                               "its forward")
        loss_stage = (r.rank == 0 and phase == 1) if self.phased else r.rank == self.n - 1
        turn = self.phased and phase == 0 and r.rank == self.n - 1
        if turn and ("B", 1, mb) not in r.done:
            raise RuntimeError(f"rank {r.rank} runs phase-0 backward of micro-batch {mb} before its phase-1 "
                               "backward")
        if not (loss_stage or turn) and r.grad.get(cmd.buffer_id) != mb:
            raise RuntimeError(f"rank {r.rank} runs backward (phase {phase}) of micro-batch {mb} without its "
                               "output gradient")
        r.grad.pop(cmd.buffer_id, None)
        r.done.add(("B", phase, mb))
        self.res.events[r.rank].append(("B" + ("" if phase is None else str(phase)), mb))
        r.clock += self.bwd
        r.busy += self.bwd


def _check_complete(ranks: List[_Rank], res: SimResult, m: int, phased: bool) -> None:
    tags = ("F0", "F1", "B0", "B1") if phased else ("F", "B")
    for r in ranks:
        events = res.events[r.rank]
        for tag in tags:
            for mb in range(m):
                if events.count((tag, mb)) != 1:
                    raise RuntimeError(f"rank {r.rank}: micro-batch {mb} ran {tag} {events.count((tag, mb))} "
                                       "times, expected once")
        tail = [type(c) for c in r.program][-3:]
        if tail != [ReduceTiedGrads, ReduceGrads, OptimizerStep]:
            raise RuntimeError(f"rank {r.rank} does not end with the gradient reductions and the step: {tail}")
