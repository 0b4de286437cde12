"""ExchangeTimeline: a dispatcher's exchange timer records every exchange as 'a2a' intervals (forward and
backward) and returns exactly what the exchange returns; kernel_overlap's interval arithmetic."""
import pytest
import torch

from piper_ds.pipeline.timeline import ExchangeTimeline, TimelineRecorder


def test_timer_records_both_directions_and_changes_nothing():
    rec = TimelineRecorder(cuda=False)
    rec.begin_step()
    rec.lane = "h0"
    timer = ExchangeTimeline(rec)
    x = torch.ones(3, 2, requires_grad=True)
    y = timer.exchange(x, lambda t: 2.0 * t)
    assert timer.counts(lambda: torch.tensor([3])).tolist() == [3]
    y.sum().backward()
    rec.end_step()
    assert torch.equal(x.grad, torch.full((3, 2), 2.0))
    rows = [(iv["kind"], iv["lane"]) for iv in rec.intervals() if "op" not in iv]
    assert rows.count(("a2a", "h0")) == 2, rows  # the forward call and its backward
    assert [iv["op"] for iv in rec.intervals() if "op" in iv] == ["counts"]


def test_timer_times_an_exchange_in_flight():
    from piper_ds.comm.alltoall import FlatAllToAll
    rec = TimelineRecorder(cuda=False)
    rec.begin_step()
    rec.lane = "h1"
    timer = ExchangeTimeline(rec)
    x = torch.ones(4, 2, requires_grad=True)
    pending = timer.started(x, lambda t: FlatAllToAll(None).start(t, [4], [4]))
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
