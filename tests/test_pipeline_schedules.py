"""Pure-logic tests of the pipeline schedules: no processes."""
import pytest
from deepspeed.runtime.pipe.schedule import (ForwardPass, RecvActivation, SendActivation, SendGrad, RecvGrad,
                                             TrainSchedule)

from piper_ds.pipeline.schedules import (OverlapBackwardPass, OverlapForwardPass, OverlapSchedule, half_program,
                                         make_schedule)
from piper_ds.pipeline.simulator import simulate

SHAPES = [(pp, m) for pp in (1, 2, 3, 4) for m in (1, 2, 3, 4, 7)]


@pytest.mark.parametrize("name", ["1f1b", "overlap"])
@pytest.mark.parametrize("pp,m", SHAPES)
def test_schedule_runs_without_deadlock(name, pp, m):
    res = simulate([make_schedule(name, m, pp, s) for s in range(pp)])
    for s, events in enumerate(res.events):
        for mb in range(m):  # every micro-batch's forward precedes its backward on every stage
            assert events.index(("F", mb)) < events.index(("B", mb))
        assert [mb for k, mb in events if k == "F"] == list(range(m))
    # sends match receives: every activation goes s -> s+1 and every gradient s+1 -> s, each micro-batch once
    acts = sorted((src, mb) for kind, src, dst, mb in res.messages if kind == "act")
    grads = sorted((dst, mb) for kind, src, dst, mb in res.messages if kind == "grad")
    assert acts == grads == sorted((s, mb) for s in range(pp - 1) for mb in range(m))


@pytest.mark.parametrize("pp,m", SHAPES)
def test_overlap_schedule_is_1f1b_with_half_instructions(pp, m):
    for s in range(pp):
        base = [[(type(c).__name__, c.kwargs) for c in step] for step in TrainSchedule(m, pp, s)]
        ours = [[(type(c).__name__, c.kwargs) for c in step] for step in OverlapSchedule(m, pp, s)]
        swap = {"OverlapForwardPass": "ForwardPass", "OverlapBackwardPass": "BackwardPass"}
        assert [[(swap.get(n, n), kw) for n, kw in step] for step in ours] == base
        kinds = {type(c) for step in OverlapSchedule(m, pp, s) for c in step}
        assert OverlapForwardPass in kinds and OverlapBackwardPass in kinds and ForwardPass not in kinds


def test_simulator_catches_deadlock_and_mismatch():
    class RecvFirst(TrainSchedule):  # both stages wait to receive before sending: a classic deadlock
        def steps(self):
            if self.stage_id == 0:
                yield [RecvGrad(0)]
            else:
                yield [RecvActivation(0)]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate([RecvFirst(2, 2, 0), RecvFirst(2, 2, 1)])

    class SendWrong(TrainSchedule):  # stage 0 sends an activation while stage 1 waits for... nothing
        def steps(self):
            yield [SendActivation(0)] if self.stage_id == 0 else [SendGrad(0)]
    with pytest.raises(RuntimeError):
        simulate([SendWrong(1, 2, 0), SendWrong(1, 2, 1)])


def test_half_program_interleaves_halves():
    prog = list(half_program(3))
    assert prog == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    for h in (0, 1):
        assert [l for hh, l in prog if hh == h] == [0, 1, 2]
    for (h1, l1), (h2, l2) in zip(prog, prog[1:]):
        assert h1 != h2  # one half's all-to-all always has the other half's compute issued beside it
    with pytest.raises(ValueError, match="num_layers"):
        list(half_program(-1))


def test_make_schedule_errors_name_values():
    with pytest.raises(ValueError, match="'zb'"):
        make_schedule("zb", 4, 2, 0)
    with pytest.raises(ValueError, match="stage_id=2"):
        make_schedule("1f1b", 4, 2, 2)


def test_dualpipev_schedule_and_engine_choice_errors():
    from piper_ds.pipeline.engine import PiperDualPipeVEngine, PiperPipelineEngine, _engine_class
    from piper_ds.pipeline.model import PiperDualPipeVModule, PiperPipelineModule
    sched = make_schedule("dualpipev", 4, 2, 1)  # DeepSpeed's DualPipeV: two virtual stages per rank
    kinds = [type(c).__name__ for step in sched for c in step]
    assert kinds.count("ForwardPass") == kinds.count("BackwardPass") == 2 * 4  # each micro-batch, both phases
    with pytest.raises(ValueError, match="at least 2 \\* 2 micro-batches"):
        make_schedule("dualpipev", 3, 2, 0)
    # the engine follows the schedule and the module; a mismatch or too few micro-batches names the values
    virtual, plain = object.__new__(PiperDualPipeVModule), object.__new__(PiperPipelineModule)
    assert _engine_class(virtual, "dualpipev", 4, 2) is PiperDualPipeVEngine
    assert _engine_class(plain, "1f1b", 1, 2) is _engine_class(plain, "overlap", 2, 2) is PiperPipelineEngine
    with pytest.raises(ValueError, match="'dualpipev' with a PiperPipelineModule"):
        _engine_class(plain, "dualpipev", 4, 2)
    with pytest.raises(ValueError, match="'1f1b' with a PiperDualPipeVModule"):
        _engine_class(virtual, "1f1b", 4, 2)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps >= 2 x pipeline ranks \(2 x 3\), got 5"):
        _engine_class(virtual, "dualpipev", 5, 3)
    # every pipeline rank needs an MoE block in one of its two virtual stages (rank r: stages r and 2 pp - 1 - r)
    assert PiperDualPipeVModule._per_rank(virtual, [1, 0, 0, 2]) == [3, 0]
    assert PiperPipelineModule._per_rank(plain, [1, 0]) == [1, 0]


DUAL_SHAPES = [(pp, m) for pp in (1, 2, 3, 4) for m in (2 * pp, 2 * pp + 1, 3 * pp, 4 * pp + 3)]


@pytest.mark.parametrize("pp,m", DUAL_SHAPES)
def test_dualpipev_runs_without_deadlock_and_routes_both_phases(pp, m):
    res = simulate([make_schedule("dualpipev", m, pp, r) for r in range(pp)], fwd=0.5, bwd=1.0)
    for r, events in enumerate(res.events):
        for phase in (0, 1):
            for mb in range(m):  # forward before backward, per rank and phase
                assert events.index((f"F{phase}", mb)) < events.index((f"B{phase}", mb))
            assert [mb for k, mb in events if k == f"F{phase}"] == list(range(m))
    # phase 0 carries activations r -> r + 1 and gradients back; phase 1 the other way; each micro-batch once
    for phase, step in ((0, 1), (1, -1)):
        acts = sorted((src, dst, mb) for k, src, dst, mb in res.messages if k == f"act{phase}")
        grads = sorted((dst, src, mb) for k, src, dst, mb in res.messages if k == f"grad{phase}")
        hops = [(r, r + step) for r in range(pp) if 0 <= r + step < pp]
        assert acts == grads == sorted((a, b, mb) for a, b in hops for mb in range(m))
    assert res.busy == [pytest.approx(3.0 * m)] * pp  # two virtual stages of half the work each


@pytest.mark.parametrize("pp,m", SHAPES)
def test_simulated_1f1b_bubble_is_the_textbook_one(pp, m):
    for name in ("1f1b", "overlap"):
        res = simulate([make_schedule(name, m, pp, s) for s in range(pp)], fwd=1.0, bwd=2.0)
        assert res.makespan == pytest.approx(3.0 * (m + pp - 1))
        assert res.bubble_fraction() == pytest.approx((pp - 1) / (m + pp - 1))


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 16), (8, 32)])
def test_dualpipev_bubble_below_1f1b_for_the_same_work(pp, m):
    one = simulate([make_schedule("1f1b", m, pp, s) for s in range(pp)], fwd=1.0, bwd=2.0)
    two = simulate([make_schedule("dualpipev", m, pp, s) for s in range(pp)], fwd=0.5, bwd=1.0)
    assert two.busy == pytest.approx(one.busy)
    # DeepSpeed's DualPipeV keeps weight gradients inside the backward: it saves pp virtual-stage forwards
    assert two.makespan == pytest.approx(one.makespan - pp / 2)
    assert two.bubble_fraction() < one.bubble_fraction()


def test_simulator_catches_dualpipev_errors():
    from deepspeed.runtime.pipe.schedule import CommitP2P, DualPipeVSchedule

    class NoCommit(DualPipeVSchedule):  # sends queued but never launched
        def steps(self):
            for step in super().steps():
                yield [c for c in step if type(c) is not CommitP2P]
    with pytest.raises(RuntimeError, match="deadlock|never committed|holds no input"):
        simulate([NoCommit(4, 2, r) for r in range(2)])

    class WrongSlot(DualPipeVSchedule):  # rank 1 receives phase-0 activations into the wrong buffer
        def steps(self):
            for step in super().steps():
                yield [RecvActivation(c.buffer_id + 1, phase=0) if type(c) is RecvActivation
                       and c.kwargs.get("phase") == 0 and self.stage_id == 1 else c for c in step]
    with pytest.raises(RuntimeError, match="into buffer"):
        simulate([WrongSlot(4, 2, r) for r in range(2)])
    with pytest.raises(ValueError, match="costs"):
        simulate([make_schedule("1f1b", 2, 1, 0)], fwd=-1.0)
