"""TimedTransport: times a transport's calls as 'a2a' intervals (forward and backward) and passes every keyword
(a hierarchical transport's ``plan=``) through to the transport it wraps; kernel_overlap's interval arithmetic."""
import pytest
import torch

from piper_ds.pipeline.timeline import TimedTransport, TimelineRecorder


class _PlannedDouble:
    """A stand-in transport that needs its plan: returns plan * x."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, send_counts, recv_counts, plan=None):
        if plan is None:
            raise ValueError("a plan is required")
        self.calls.append((list(send_counts), list(recv_counts), plan))
        return x * plan

    def plan(self, send_counts):
        return 2.0


def test_timed_transport_passes_the_plan_and_records_both_directions():
    inner, rec = _PlannedDouble(), TimelineRecorder(cuda=False)
    rec.begin_step()
    rec.lane = "h0"
    timed = TimedTransport(inner, rec)
    x = torch.ones(3, 2, requires_grad=True)
    y = timed(x, [3], [3], plan=timed.plan([3]))  # plan() reaches the inner transport through the wrapper
    y.sum().backward()
    rec.end_step()
    assert inner.calls == [([3], [3], 2.0)]
    assert torch.equal(x.grad, torch.full((3, 2), 2.0))
    kinds = [(iv["kind"], iv["lane"]) for iv in rec.intervals()]
    assert kinds.count(("a2a", "h0")) == 2, kinds  # the forward call and its backward


def test_timed_transport_times_an_exchange_in_flight():
    from piper_ds.comm.alltoall import FlatAllToAll
    rec = TimelineRecorder(cuda=False)
    rec.begin_step()
    rec.lane = "h1"
    timed = TimedTransport(FlatAllToAll(None), rec)
    x = torch.ones(4, 2, requires_grad=True)
    pending = timed.start(x, [4], [4])
    y = pending.wait()
    (3 * y).sum().backward()
    rec.end_step()
    assert torch.equal(x.grad, torch.full((4, 2), 3.0))
    kinds = [(iv["kind"], iv["lane"]) for iv in rec.intervals()]
    assert kinds.count(("a2a", "h1")) == 2, kinds  # start..wait, and its backward


def test_kernel_overlap_counts_communication_under_compute():
    from types import SimpleNamespace as Ev

    from piper_ds.pipeline.timeline import kernel_overlap

    def ev(name, a, b):
        return Ev(name=name, time_range=Ev(start=a, end=b))

    # NCCL in [0, 12] (two overlapping kernels), compute in [5, 20]: 7 of 12 us under compute
    got = kernel_overlap([ev("ncclDevKernel_SendRecv", 0, 10), ev("gemm", 5, 20), ev("ncclKernel_AllToAll", 8, 12)])
    assert got.comm_us == 12 and got.compute_us == 15 and got.hidden_share == pytest.approx(7 / 12)
    assert kernel_overlap([ev("gemm", 0, 1)]).hidden_share == 0.0


def test_step_intervals_keeps_one_step_on_its_own_clock():
    from piper_ds.pipeline.timeline import step_intervals
    ivs = [dict(kind="fwd", start=0.5, end=0.9), dict(kind="bwd", start=2.1, end=2.6), dict(kind="fwd", start=3.2,
                                                                                          end=3.4)]
    got = step_intervals(ivs, (2.0, 3.0))
    assert [(i["kind"], i["start"], i["end"]) for i in got] == [("bwd", pytest.approx(0.1), pytest.approx(0.6))]
