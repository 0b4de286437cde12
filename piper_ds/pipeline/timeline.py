"""Per-rank timeline of a pipelined step: forward, backward, p2p and all-to-all intervals, metrics and a plot.

A :class:`TimelineRecorder` attached to a :class:`~piper_ds.pipeline.engine.PiperPipelineEngine` records

* every schedule instruction (kind 'fwd', 'bwd', 'p2p', 'grad_sync', 'optimizer', 'load'; lane 'main');
* under the overlap schedule, every layer of every half (kind 'layer_fwd' / 'layer_bwd', lane 'h0' / 'h1');
* every MoE exchange (kind 'a2a'; lane of the half that issued it, or 'main'), forward and backward
  (backward bounds come from identity autograd nodes around the transport).

Clocks: CUDA events on the stream that runs the work (GPU; read after a synchronize) or ``perf_counter``
(CPU, where the halves run one after the other). Times are seconds from the step start.

Metrics: :func:`bubble_fraction` = 1 - busy('fwd','bwd') / step; :func:`a2a_hidden_share` = share of
all-to-all time during which the *other* half computes (layer time outside its own all-to-alls) — 0 under
1F1B by construction, and 0 on CPU (sequential halves); :func:`kernel_overlap` = share of NCCL kernel time during
which other kernels run, from a profiler trace (the device's own view of overlap).
"""
from __future__ import annotations

import contextlib
import itertools
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

Interval = Dict[str, Any]  # {"kind", "lane", "start", "end", "rank", "stage", ...}


class _Mark(torch.autograd.Function):
    """Identity whose backward calls ``hook()`` (a timestamp when the gradient passes)."""

    @staticmethod
    def forward(ctx, x, hook):
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.hook()
        return grad, None


class TimelineRecorder:
    """Collects intervals of one rank; see the module docstring. ``cuda``: None = decide from the engine."""

    def __init__(self, cuda: Optional[bool] = None):
        self.cuda, self.lane = cuda, "main"
        self.rank = self.stage = 0
        self._raw: List[Tuple[str, str, Any, Any, Dict[str, Any]]] = []
        self._open: Dict[int, Tuple[str, str, Any]] = {}
        self._ids = itertools.count()
        self._base = None
        self.steps: List[Tuple[Any, Any]] = []

    # ---------------------------------------------------------------------------------- recording
    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def attach(self, engine) -> None:
        """Instruments ``engine``: its rank/stage, its module's MoE transports and half layers."""
        import deepspeed.comm as dist
        self.rank, self.stage = dist.get_rank(), engine.stage_id
        if self.cuda is None:
            self.cuda = torch.device(engine.device).type == "cuda"  # DeepSpeed's device: a torch.device, str or int
        engine.module.timeline = self
        from piper_ds.moe import PiperMoE
        for m in engine.module.modules():
            if isinstance(m, PiperMoE):
                m.deepspeed_moe.dispatcher.timer = ExchangeTimeline(self)

    def begin_step(self) -> None:
        start = self._now()
        if self._base is None:
            self._base = start
        self.steps.append((start, None))

    def end_step(self) -> None:
        self.steps[-1] = (self.steps[-1][0], self._now())

    def now(self):
        """A time mark: a recorded CUDA event on the current stream (GPU) or ``perf_counter`` seconds (CPU)."""
        return self._now()

    def add(self, kind: str, lane: str, start, end, **meta) -> None:
        """Records the interval between two marks of :meth:`now`."""
        self._raw.append((kind, lane, start, end, meta))

    @contextlib.contextmanager
    def interval(self, kind: str, lane: Optional[str] = None, **meta):
        """Records the forward-time interval of the enclosed work as ``kind`` on ``lane``."""
        start = self._now()
        try:
            yield
        finally:
            self._raw.append((kind, lane or self.lane, start, self._now(), meta))

    def mark_backward(self, x: torch.Tensor, kind: str, lane: str, key: int, opens: bool) -> torch.Tensor:
        """Identity on ``x``; when its gradient passes, opens (``opens``) or closes interval ``key``."""
        if not x.requires_grad:
            return x

        def hook():
            if opens:
                self._open[key] = (kind, lane, self._now())
            elif key in self._open:
                k, ln, start = self._open.pop(key)
                self._raw.append((k, ln, start, self._now(), {}))
        return _Mark.apply(x, hook)

    def new_key(self) -> int:
        return next(self._ids)

    # ------------------------------------------------------------------------------------ reading
    def _seconds(self, mark) -> float:
        if self.cuda:
            return self._base.elapsed_time(mark) / 1e3
        return mark - self._base

    def intervals(self) -> List[Interval]:
        """This rank's intervals in seconds from its first step start (synchronizes the device)."""
        if self.cuda:
            torch.cuda.synchronize()
        return [dict(kind=k, lane=ln, start=self._seconds(a), end=self._seconds(b), rank=self.rank,
                     stage=self.stage, **meta) for k, ln, a, b, meta in self._raw]

    def step_bounds(self) -> List[Tuple[float, float]]:
        """(start, end) seconds of every recorded step."""
        if self.cuda:
            torch.cuda.synchronize()
        return [(self._seconds(a), self._seconds(b)) for a, b in self.steps if b is not None]

    def reset(self) -> None:
        """Forgets everything recorded (e.g. after warm-up)."""
        self._raw, self._open, self.steps, self._base = [], {}, [], None


class ExchangeTimeline:
    """A dispatcher's exchange timer (:class:`piper_ds.moe.dispatcher.ExchangeTimer`): records every exchange as
    'a2a' (forward, and through autograd marks backward) and the counts exchange as 'a2a' with op 'counts'."""

    def __init__(self, recorder: TimelineRecorder):
        self.rec = recorder

    def counts(self, run):
        with self.rec.interval("a2a", op="counts"):
            return run()

    def exchange(self, x, run):
        rec, lane, key = self.rec, self.rec.lane, self.rec.new_key()
        x = rec.mark_backward(x, "a2a", lane, key, opens=False)
        with rec.interval("a2a", lane):
            y = run(x)
        return rec.mark_backward(y, "a2a", lane, key, opens=True)

    def started(self, x, start):
        """Timed from the launch to the end of its wait; backward from the reverse launch to its wait."""
        rec, lane, key = self.rec, self.rec.lane, self.rec.new_key()
        x = rec.mark_backward(x, "a2a", lane, key, opens=False)
        return _TimedExchange(start(x), rec, lane, key)


class _TimedExchange:
    """An exchange in flight whose :meth:`wait` closes its 'a2a' interval."""

    def __init__(self, inner, rec: TimelineRecorder, lane: str, key: int):
        self.inner, self.rec, self.lane, self.key, self.started = inner, rec, lane, key, rec.now()

    def wait(self):
        y = self.inner.wait()
        self.rec.add("a2a", self.lane, self.started, self.rec.now())
        return self.rec.mark_backward(y, "a2a", self.lane, self.key, opens=True)


# ---------------------------------------------------------------------------------------- metrics
def _union(spans: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    out: List[Tuple[float, float]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(spans) -> float:
    return sum(b - a for a, b in _union(spans))


def _intersect(a_spans, b_spans) -> float:
    total, a_u, b_u = 0.0, _union(a_spans), _union(b_spans)
    for a0, a1 in a_u:
        for b0, b1 in b_u:
            total += max(0.0, min(a1, b1) - max(a0, b0))
    return total


def _subtract(spans, minus) -> List[Tuple[float, float]]:
    out = []
    for a, b in _union(spans):
        cur = [(a, b)]
        for m0, m1 in _union(minus):
            cur = [p for c0, c1 in cur for p in ((c0, min(c1, m0)), (max(c0, m1), c1)) if p[1] > p[0]]
        out += cur
    return out


def bubble_fraction(intervals: Sequence[Interval], step: Tuple[float, float]) -> float:
    """1 - (time in forward/backward instructions) / step length, for one rank and one step."""
    t0, t1 = step
    busy = [(max(i["start"], t0), min(i["end"], t1)) for i in intervals if i["kind"] in ("fwd", "bwd")]
    return 1.0 - _length(busy) / (t1 - t0)


def a2a_hidden_share(intervals: Sequence[Interval]) -> Tuple[float, float]:
    """(hidden share, total a2a seconds) of one rank: all-to-all time of half h during which half 1-h
    computes (its layer intervals minus its own all-to-alls). 0 when there are no halves (1F1B)."""
    total = hidden = 0.0
    for h, other in (("h0", "h1"), ("h1", "h0")):
        a2a = [(i["start"], i["end"]) for i in intervals if i["kind"] == "a2a" and i["lane"] == h]
        busy = [(i["start"], i["end"]) for i in intervals if i["lane"] == other and i["kind"].startswith("layer")]
        busy = _subtract(busy, [(i["start"], i["end"]) for i in intervals if i["kind"] == "a2a" and i["lane"] == other])
        total += _length(a2a)
        hidden += _intersect(a2a, busy)
    main = _length([(i["start"], i["end"]) for i in intervals if i["kind"] == "a2a" and i["lane"] == "main"])
    total += main
    return (hidden / total if total else 0.0), total


class KernelOverlap(NamedTuple):
    """Communication and compute kernel time of a profiled span (µs) and the share of the first under the second."""

    comm_us: float  # union of the communication kernels' intervals
    compute_us: float  # union of every other kernel's intervals
    hidden_share: float  # share of comm_us during which a compute kernel runs


def kernel_overlap(kernels) -> KernelOverlap:
    """How much communication kernel time (NCCL's) ran under compute kernels, from profiler CUDA events (any
    objects with ``.name`` and ``.time_range.start/.end`` in µs). NCCL kernel time includes each rank's wait for
    its peers."""
    comm = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
    compute = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()]
    comm_us = _length(comm)
    return KernelOverlap(comm_us, _length(compute), _intersect(comm, compute) / comm_us if comm_us else 0.0)


# ------------------------------------------------------------------------------------------- plot
COLORS = {"fwd": "#4C72B0", "bwd": "#55A868", "layer_fwd": "#8DA9D6", "layer_bwd": "#9ED3A8", "a2a": "#C44E52",
          "p2p": "#999999", "grad_sync": "#DD8452", "optimizer": "#8172B3", "load": "#CCCCCC"}


def plot_timeline(intervals: Sequence[Interval], path: str, title: str = "") -> str:
    """Writes a PNG with one row per (rank, lane): main instructions, and the two halves' layers and
    all-to-alls. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted({(i["rank"], i["lane"]) for i in intervals})
    fig, ax = plt.subplots(figsize=(14, 0.45 * len(rows) + 1.5))
    for y, (rank, lane) in enumerate(rows):
        for i in sorted(intervals, key=lambda i: i["kind"] == "a2a"):  # all-to-alls drawn on top
            if (i["rank"], i["lane"]) == (rank, lane):
                ax.barh(y, i["end"] - i["start"], left=i["start"], height=0.8 if i["kind"] != "a2a" else 0.4,
                        color=COLORS.get(i["kind"], "#444444"), edgecolor="none")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank {r} (stage {next(i['stage'] for i in intervals if i['rank'] == r)}) {ln}"
                        for r, ln in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), ncol=len(COLORS), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_intervals(intervals: Sequence[Interval], step: Tuple[float, float]) -> List[Interval]:
    """The intervals that start inside ``step`` (start, end), with times shifted to the step's start."""
    t0, t1 = step
    return [dict(i, start=i["start"] - t0, end=i["end"] - t0) for i in intervals if t0 <= i["start"] <= t1]


def gather_intervals(recorder: TimelineRecorder, step: Optional[int] = -1) -> List[Interval]:
    """Every rank's intervals of its recorded step ``step`` (None: all, unshifted), in seconds from that step's
    start on the rank's own clock (collective; every rank gets the list). The pipeline's step-start
    synchronisation keeps the ranks' step starts close."""
    import deepspeed.comm as dist
    mine = recorder.intervals()
    if step is not None:
        mine = step_intervals(mine, recorder.step_bounds()[step])
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [i for part in out for i in part]
