"""TimedTransport: times a transport's calls as 'a2a' intervals (forward and backward) and passes every keyword
(a hierarchical transport's ``plan=``) through to the transport it wraps."""
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
