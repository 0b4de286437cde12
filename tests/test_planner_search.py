"""Layout search: property tests that no returned layout breaks a constraint; binding-constraint messages."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piper_ds.planner.cluster import CLUSTERS, ClusterSpec
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.search import NothingFits, SearchOptions, best, search
from piper_ds.system.specs import ModelSpec


def independent_violations(model, cluster, est, gpus, batch, allow_cross):
    """The constraints of the issue, re-stated here without the planner's helpers."""
    lay, bad = est.layout, []
    if lay.dp * lay.pp != gpus:
        bad.append("gpus")
    if lay.micro_batch * lay.grad_accum * lay.dp != batch:
        bad.append("batch")
    if model.num_experts % lay.ep or lay.dp % lay.ep:
        bad.append("ep")
    if lay.pp > model.n_layers:
        bad.append("pp")
    g = cluster.gpus_per_node
    if not allow_cross and gpus > g and (lay.ep > g or g % lay.ep):
        bad.append("ep_in_node")
    if lay.zero_stage == 3 or (lay.pp > 1 and lay.zero_stage > 1):
        bad.append("zero")
    if max(m.total for m in est.memory) > cluster.hbm_gib * 2 ** 30:
        bad.append("memory")
    return bad


models = st.builds(
    lambda e, k, layers, d, shared, dense: ModelSpec(
        vocab_size=512, d_model=d, n_layers=layers, n_heads=4, seq_len=256, num_experts=e, top_k=min(k, e),
        d_ffn_expert=2 * d, n_shared_experts=shared, n_dense_layers=min(dense, layers)),
    e=st.sampled_from([2, 3, 4, 6, 8, 16, 64]), k=st.integers(1, 8), layers=st.integers(1, 9),
    d=st.sampled_from([64, 256, 1024]), shared=st.integers(0, 2), dense=st.integers(0, 2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models, cluster=st.sampled_from(sorted(CLUSTERS)), gpus=st.sampled_from([1, 2, 4, 8, 16, 32]),
       batch_mult=st.sampled_from([1, 2, 3, 8]), hbm=st.sampled_from([None, 0.05, 2.0, 16.0]),
       pin=st.sampled_from([{}, {"pp": 2}, {"ep": 2}, {"zero_stage": 2}, {"micro_batch": 2}, {"zero_stage": 3}]),
       allow_cross=st.booleans())
def test_search_never_returns_a_layout_breaking_a_constraint(model, cluster, gpus, batch_mult, hbm, pin,
                                                             allow_cross):
    c = ClusterSpec.preset(cluster, **({"hbm_gib": hbm} if hbm else {}))
    batch = gpus * batch_mult
    opts = SearchOptions(allow_cross_node_ep=allow_cross, max_micro_batch=4, **pin)
    res = search(model, c, gpus, batch, PlatformProfile(), opts)
    for est in res.ranked:
        assert independent_violations(model, c, est, gpus, batch, allow_cross) == [], est.layout
    speeds = [e.tokens_per_s for e in res.ranked]
    assert speeds == sorted(speeds, reverse=True)
    if res.ranked:
        assert best(res) is res.ranked[0]
    else:
        with pytest.raises(NothingFits) as err:
            best(res)
        assert err.value.binding in str(err.value)


def test_memory_binding_names_overshoot():
    with pytest.raises(NothingFits, match=r"binding constraint 'memory'.*over by [0-9.]+ GiB") as err:
        best(search(ModelSpec.preset("deepseek-v3"), ClusterSpec.preset("h200-nvlink-ib400"), 8, 64))
    assert err.value.binding == "memory"


@pytest.mark.parametrize("pin,binding,text", [
    ({"zero_stage": 3}, "zero3_moe", "ZeRO-3 is rejected by DeepSpeed's native MoE"),
    ({"pp": 2, "zero_stage": 2}, "zero_pp", r"zero_stage \(2\) must be <= 1 with pp \(2\) > 1"),
    ({"ep": 16}, "ep_in_node", r"ep \(16\) crosses nodes of 8 GPUs"),
    ({"ep": 3}, "ep_divides_dp", r"ep \(3\) must divide dp \(16\)"),
    ({"pp": 32}, "pp_layers", r"pp \(32\) must be <= n_layers \(2\)"),
])
def test_structural_binding_constraints(pin, binding, text):
    model = ModelSpec.preset("tiny", num_experts=64)
    res = search(model, ClusterSpec.preset("h200-nvlink-ib400"), 32 if pin.get("pp") == 32 else 16, 64,
                 opts=SearchOptions(**pin))
    with pytest.raises(NothingFits, match=text) as err:
        best(res)
    assert err.value.binding == binding


def test_a_job_across_nodes_fills_them_and_every_rank_holds_moe_blocks():
    h200 = ClusterSpec.preset("h200-nvlink-ib400")
    with pytest.raises(NothingFits, match=r"gpus \(12\) span nodes of 8 GPUs") as err:
        best(search(ModelSpec.preset("tiny", num_experts=64), h200, 12, 48))
    assert err.value.binding == "whole_nodes"
    # two blocks, the first dense: the 2-stage cut leaves rank 0 without an MoE block
    with pytest.raises(NothingFits, match=r"pipeline ranks without MoE blocks \(MoE blocks per rank \[0, 1\]\)"):
        best(search(ModelSpec.preset("tiny", n_dense_layers=1), h200, 2, 8, opts=SearchOptions(pp=2)))


def test_experts_not_divisible_and_batch():
    model = ModelSpec.preset("tiny", num_experts=6)
    with pytest.raises(NothingFits, match=r"num_experts \(6\) must be divisible by ep \(4\)"):
        best(search(model, ClusterSpec.preset("h100-nvlink-ib400"), 4, 8, opts=SearchOptions(ep=4)))
    with pytest.raises(NothingFits, match=r"global batch \(6\) must be divisible by dp \(4\)"):
        best(search(model, ClusterSpec.preset("h100-nvlink-ib400"), 4, 6, opts=SearchOptions(pp=1)))


def test_search_explores_pipeline_and_cross_node_ep():
    model = ModelSpec.preset("xmoe-medium")
    c = ClusterSpec.preset("h200-nvlink-ib400")
    res = search(model, c, 64, 512, opts=SearchOptions(allow_cross_node_ep=True, max_micro_batch=2))
    seen = {(e.layout.pp > 1, e.layout.ep > 8, e.layout.a2a) for e in res.ranked}
    assert (True, False, "flat") in seen and any(ep and a2a == "hierarchical" for _, ep, a2a in seen)
    top = best(res)
    assert top.tokens_per_s == max(e.tokens_per_s for e in res.ranked)
