"""Tier 1: topology from the launcher's environment, the override, and group layouts across nodes."""
import pytest
from pydantic import ValidationError

from piper_ds.comm.topology import GroupLayout, Topology, TopologyConfig


@pytest.mark.parametrize("env, per_node, source", [
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 4, "LOCAL_WORLD_SIZE"),
    ({"WORLD_SIZE": "8", "LOCAL_SIZE": "2"}, 2, "LOCAL_SIZE"),
    ({"WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 8, "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ({"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8"}, 8, "SLURM_NTASKS_PER_NODE"),
    ({"SLURM_NTASKS": "12", "SLURM_TASKS_PER_NODE": "4(x3)"}, 4, "SLURM_TASKS_PER_NODE"),
    ({"WORLD_SIZE": "6"}, 6, "default: one node"),
])
def test_from_env(env, per_node, source):
    topo = Topology.from_env(env=env)
    assert (topo.gpus_per_node, topo.source) == (per_node, source)
    assert topo.num_nodes == topo.world_size // per_node


def test_override_makes_one_host_several_nodes():
    topo = Topology.from_env(2, env={"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"})
    assert (topo.num_nodes, topo.gpus_per_node, topo.source) == (2, 2, "override")
    assert [topo.node_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert [topo.local_rank_of(r) for r in range(4)] == [0, 1, 0, 1]
    assert topo.ranks_on_node(1) == [2, 3]
    cfg = TopologyConfig.model_validate({"gpus_per_node": 2})
    assert Topology.from_config(cfg, world_size=4) == Topology(4, 2, "override")


def test_errors_name_values():
    with pytest.raises(ValueError, match=r"world_size \(6\) is not divisible by gpus_per_node \(4, from LOCAL"):
        Topology.from_env(env={"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="different task counts"):
        Topology.from_env(env={"SLURM_NTASKS": "6", "SLURM_TASKS_PER_NODE": "4,2"})
    with pytest.raises(ValueError, match="rank 9 out of range for world_size 8"):
        Topology(8, 4).node_of(9)
    with pytest.raises(ValidationError):
        TopologyConfig.model_validate({"gpus_per_node": 0})
    with pytest.raises(ValidationError):
        TopologyConfig.model_validate({"gpus_per_nodes": 2})


def test_group_layout_of_an_expert_parallel_subgroup():
    topo = Topology(16, 4)
    # an EP group of 4 taking ranks 2,3 of node 0 and 2,3 of node 2
    lay = topo.group_layout([2, 3, 10, 11])
    assert (lay.num_nodes, lay.local_size, lay.spans_nodes) == (2, 2, True)
    assert [lay.coords(g) for g in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert lay.describe() == "2 nodes x 2 ranks"
    assert not topo.group_layout([4, 5, 6, 7]).spans_nodes
    strided = topo.group_layout([0, 4, 1, 5])  # group ranks interleave the nodes
    assert strided.members == ((0, 2), (1, 3))
    with pytest.raises(ValueError, match=r"different numbers of ranks per node \(node: ranks = \{0: 2, 1: 1\}\)"):
        topo.group_layout([0, 1, 4])


def test_group_layout_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="3 ranks but 2 node ids"):
        GroupLayout.build([0, 1, 2], [0, 0])
