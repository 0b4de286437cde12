"""The planner's model of DeepSpeed's DualPipeV schedule (Layout.virtual_stages = 2): which blocks a rank holds,
its in-flight activations and bubble (both against the schedule's own instructions), the estimate against the
same layout under 1F1B, the search and the written ds_config."""
import pytest

from piper_ds.planner.cluster import ClusterSpec
from piper_ds.planner.dsconfig import build_ds_config
from piper_ds.system.layout import Layout
from piper_ds.planner.memory import dualpipev_in_flight, holds_head, phase_blocks, rank_blocks, stage_params
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.resources import bubble_micro_batches, estimate
from piper_ds.planner.search import SearchOptions, search
from piper_ds.system.specs import ModelSpec
from piper_ds.system.stages import stage_blocks

H200 = ClusterSpec.preset("h200-nvlink-ib400")
SPEC = ModelSpec.preset("xmoe-small-swiglu", n_layers=12, n_dense_layers=1)


def _lay(virtual, **kw):
    return Layout(**{**dict(dp=2, ep=2, pp=2, zero_stage=1, micro_batch=2, grad_accum=8,
                            virtual_stages=virtual), **kw})


def test_layout_validation_names_the_values():
    assert _lay(2).schedule == "dualpipev" and _lay(1).schedule == "1f1b"
    assert _lay(1, overlap_a2a=True).schedule == "overlap" and _lay(2).short().endswith(" dualpipev")
    for bad in (dict(pp=1, dp=4), dict(grad_accum=3), dict(overlap_a2a=True)):
        with pytest.raises(ValueError, match="virtual_stages 2 \\(DualPipeV\\) needs pp >= 2"):
            _lay(2, **bad)
    with pytest.raises(ValueError):
        _lay(3)


def test_virtual_stages_and_what_each_rank_holds():
    # 13 blocks over 2 x 3 virtual stages of the pipeline's cut: rank r holds stages r and 5 - r
    spec = ModelSpec.preset("xmoe-small-swiglu", n_layers=13, n_dense_layers=1)
    parts = stage_blocks(spec, 1, 1, 6)
    assert [len(p) for p in parts] == [3, 2, 2, 2, 2, 2] and parts[-1].stop == 13
    lay = Layout(dp=1, pp=3, grad_accum=6, virtual_stages=2)
    assert phase_blocks(spec, lay, 0) == [parts[0], parts[5]] and phase_blocks(spec, lay, 2) == [parts[2], parts[3]]
    assert sorted(b for r in range(3) for b in rank_blocks(spec, lay, r)) == list(range(13))
    assert holds_head(lay, 0) and not holds_head(lay, 2)
    assert holds_head(Layout(dp=1, pp=3, grad_accum=6), 2)
    # rank 0 holds the embedding and the head; a tied table once (DualPipeV keeps both ends on rank 0)
    tied = ModelSpec.preset("xmoe-small-swiglu", n_layers=12, n_dense_layers=1, tie_embeddings=True)
    v = tied.vocab_size * tied.d_model
    assert stage_params(tied, _lay(1), 0)[0] + stage_params(tied, _lay(1), 1)[0] == pytest.approx(
        stage_params(tied, _lay(2), 0)[0] + stage_params(tied, _lay(2), 1)[0] + v)


@pytest.mark.parametrize("pp,m", [(2, 4), (2, 9), (3, 6), (4, 8), (4, 13), (6, 12)])
def test_in_flight_and_bubble_match_deepspeeds_schedule(pp, m):
    from piper_ds.pipeline.schedules import make_schedule
    from piper_ds.pipeline.simulator import simulate
    for r in range(pp):  # every (phase 0, phase 1) in-flight state is at or below the planner's peak, which occurs
        n, states = [0, 0], set()
        for step in make_schedule("dualpipev", m, pp, r):
            for c in step:
                name = type(c).__name__
                if name in ("ForwardPass", "BackwardPass"):
                    n[c.kwargs["phase"]] += 1 if name == "ForwardPass" else -1
                    states.add(tuple(n))
        peak = dualpipev_in_flight(pp, r)
        assert peak in states and all(a <= peak[0] and b <= peak[1] for a, b in states)
    for ckpt, bwd in ((False, 2.0), (True, 3.0)):  # recomputation: the backward holds a second forward
        sim = simulate([make_schedule("dualpipev", m, pp, r) for r in range(pp)], fwd=0.5, bwd=bwd / 2)
        lay = Layout(dp=1, pp=pp, grad_accum=m, virtual_stages=2, activation_checkpointing=ckpt)
        assert bubble_micro_batches(lay) == pytest.approx((sim.makespan - sim.busy[0]) / (1.0 + bwd))
        one = simulate([make_schedule("1f1b", m, pp, r) for r in range(pp)], fwd=1.0, bwd=bwd)
        assert bubble_micro_batches(lay.model_copy(update={"virtual_stages": 1})) == pytest.approx(
            (one.makespan - one.busy[0]) / (1.0 + bwd))


def test_estimate_against_1f1b_on_the_same_layout():
    one, two = estimate(SPEC, H200, _lay(1)), estimate(SPEC, H200, _lay(2))
    assert two.step_parts["bubble"] < one.step_parts["bubble"]
    assert two.step_parts["compute"] == pytest.approx(one.step_parts["compute"], rel=0.05)
    assert two.step_parts["p2p"] >= one.step_parts["p2p"]  # each boundary crossed in both phases
    # 2 pp + 1 virtual-stage activations on every rank; 1F1B's last stage holds one micro-batch
    assert [m.in_flight for m in two.memory] == [5, 5] and [m.in_flight for m in one.memory] == [2, 1]
    assert two.memory[1].kinds["activations"] > one.memory[1].kinds["activations"]
    assert len(two.memory[0].blocks) == 2 and len(one.memory[0].blocks) == 1
    # the loss (head, logits) sits on rank 0 under DualPipeV, on the last rank under 1F1B
    assert two.stage_times[0]["dense"] > two.stage_times[1]["dense"]


def test_search_and_ds_config():
    spec = ModelSpec.preset("xmoe-small-swiglu", n_layers=8, n_dense_layers=1)
    off = search(spec, H200, 4, 32, PlatformProfile(), SearchOptions(pp=2))
    on = search(spec, H200, 4, 32, PlatformProfile(), SearchOptions(pp=2, consider_dualpipev=True))
    assert all(e.layout.virtual_stages == 1 for e in off.ranked)
    dual = [e.layout for e in on.ranked if e.layout.virtual_stages == 2]
    assert dual and all(lay.grad_accum >= 2 * lay.pp for lay in dual)
    assert len(on.ranked) > len(off.ranked)
    cfg = build_ds_config(spec, dual[0])
    assert cfg["piper"]["pipeline"] == {"schedule": "dualpipev", "virtual_stages": 2}
    assert build_ds_config(spec, _lay(1, overlap_a2a=True))["piper"]["pipeline"]["schedule"] == "overlap"
