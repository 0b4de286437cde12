"""The (pp, dp, ep) mesh: rank lists and layout errors that name every factor (pure logic)."""
import pytest

from piper_ds.pipeline.groups import MeshLayout


def test_mesh_rank_lists_pp2_ep2_world8():
    m = MeshLayout(world_size=8, pp=2, ep=2, gpus_per_node=4)
    assert (m.dp, m.edp) == (4, 2)
    assert m.stage_ranks(1) == [4, 5, 6, 7]
    assert m.ep_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert m.edp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for g in m.ep_groups():  # EP inside a stage and inside a node
        assert len({m.stage_of(r) for r in g}) == 1 and len({r // 4 for r in g}) == 1
    assert "pp 2" in m.describe() and "ep 2" in m.describe()


def test_mesh_matches_deepspeed_legacy_expert_groups():
    # DeepSpeed's _create_expert_and_data_parallel (no TP) with pp: EP = consecutive runs, expert-DP strided
    # inside each stage; recompute that rule here independently.
    for world, pp, ep in [(4, 2, 2), (8, 2, 4), (16, 4, 2), (8, 1, 8)]:
        m = MeshLayout(world_size=world, pp=pp, ep=ep, gpus_per_node=8, allow_cross_node_ep=True)
        stride = world // pp
        edp = [list(range(s + i, s + stride, ep)) for s in range(0, world, stride) for i in range(ep)]
        assert m.edp_groups() == edp
        assert m.ep_groups() == [list(range(i * ep, (i + 1) * ep)) for i in range(world // ep)]


@pytest.mark.parametrize("kwargs,needles", [
    (dict(world_size=6, pp=4, ep=1), ["pp (4)", "world size (6)"]),
    (dict(world_size=8, pp=2, ep=3), ["ep (3)", "dp = world 8 / pp 2 = 4"]),
    (dict(world_size=8, pp=2, ep=2, zero_stage=2), ["ZeRO stage 2", "pp (2)", "ZeRO 0 and 1"]),
    (dict(world_size=8, pp=4, ep=1, n_blocks=3), ["pp (4)", "blocks (3)"]),
    (dict(world_size=8, pp=1, ep=8, gpus_per_node=4), ["ep (8)", "nodes of 4 ranks", "pp (1)"]),
    (dict(world_size=12, pp=2, ep=3, gpus_per_node=4), ["ep (3)", "4"]),
    (dict(world_size=8, pp=2, ep=4, num_experts=6), ["num_experts (6)", "ep (4)"]),
    (dict(world_size=0, pp=1, ep=1), ["world_size", "0"]),
])
def test_bad_layouts_name_the_values(kwargs, needles):
    with pytest.raises(ValueError) as err:
        MeshLayout(**kwargs)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_cross_node_ep_allowed_explicitly():
    m = MeshLayout(world_size=16, pp=1, ep=16, gpus_per_node=8, allow_cross_node_ep=True)
    assert m.ep_groups() == [list(range(16))]
