"""Tier 3: the hierarchical transport equals the flat one on gloo (outputs and gradients, bit for bit).

One process launch per world size keeps this file fast: every topology, dtype and random split is checked
inside the same workers. Counts are random per (seed, rank pair), including zeros and all-zero ranks.
"""
from unittest import mock

import torch
import torch.distributed as dist

from piper_ds.comm import hierarchical
from piper_ds.comm.alltoall import FlatAllToAll
from piper_ds.comm.hierarchical import HierarchicalAllToAll, spans_nodes
from piper_ds.comm.topology import Topology
from piper_ds.comm.transports import make_transport
from piper_ds.testing import run_distributed


def _counts(seed, W, zeros):
    g = torch.Generator().manual_seed(seed)
    C = torch.randint(1, 6, (W, W), generator=g)
    return C * (torch.rand(W, W, generator=g) >= zeros)


def _check_case(flat, hier, rank, W, seed, zeros, dtype, tail):
    C = _counts(seed, W, zeros)
    send_t = C[rank].clone()
    recv_t = hier.exchange_counts(send_t)
    assert torch.equal(recv_t, flat.exchange_counts(send_t)), (seed, recv_t)
    send, recv = send_t.tolist(), recv_t.tolist()
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn((sum(send), ) + tail, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn((sum(recv), ) + tail, generator=g, dtype=torch.float64).to(dtype)
    outs, grads = [], []
    for t in (flat, hier):
        xr = x.clone().requires_grad_(True)
        y = t(xr, send, recv)
        (y.float() * w.float()).sum().backward()
        outs.append(y.detach())
        grads.append(xr.grad)
    assert torch.equal(outs[0], outs[1]), f"outputs differ (seed {seed}, {hier})"
    assert torch.equal(grads[0], grads[1]), f"gradients differ (seed {seed}, {hier})"
    # the plan path: counts exchange gives the lanes; its reverse sends the rows back (combine direction)
    plan = hier.plan(send_t)
    assert plan.recv_counts == tuple(recv)
    y = hier(x, send, recv, plan=plan)
    assert torch.equal(y, outs[0])
    assert torch.equal(hier(y, recv, send, plan=plan.reversed()), x)


def check_transports(rank, world_size, per_node_options, seeds):
    world = dist.group.WORLD
    flat = FlatAllToAll(world)
    checked = 0
    for per_node in per_node_options:
        hier = HierarchicalAllToAll(world, Topology(world_size, per_node))
        for k, seed in enumerate(seeds):
            zeros = (0.0, 0.3, 0.6, 1.0)[k % 4]
            dtype, tail = [(torch.float64, (3, )), (torch.bfloat16, (2, 4)), (torch.float32, (5, ))][k % 3]
            _check_case(flat, hier, rank, world_size, seed, zeros, dtype, tail)
            checked += 1
    return checked


def check_all(rank, world_size, per_node_options, seeds):
    return check_transports(rank, world_size, per_node_options, seeds), check_subgroup_and_auto(rank, world_size)


def check_subgroup_and_auto(rank, world_size):
    topo = Topology(world_size, 2)  # 4 ranks as 2 nodes x 2
    sub = dist.new_group([1, 3])  # one rank on each node: a 2 x 1 group
    world = dist.group.WORLD
    assert spans_nodes(world, topo) and spans_nodes(sub, topo)
    assert not spans_nodes(world, Topology(world_size, world_size)) and not spans_nodes(None, topo)
    assert isinstance(make_transport("auto", world, topo), HierarchicalAllToAll)
    assert isinstance(make_transport("auto", world, Topology(world_size, world_size)), FlatAllToAll)
    assert isinstance(make_transport("hierarchical", world, Topology(world_size, world_size)),
                      HierarchicalAllToAll)
    # one node: the call is the flat exchange itself (one all_to_all_single), no point-to-point round
    one_node = HierarchicalAllToAll(world, Topology(world_size, world_size))
    send_t = _counts(5, world_size, 0.3)[rank].clone()
    recv = one_node.exchange_counts(send_t).tolist()
    x = torch.randn(int(send_t.sum()), 3, dtype=torch.float64)
    with mock.patch.object(hierarchical.dist, "batch_isend_irecv", side_effect=AssertionError("p2p on one node")):
        assert torch.equal(one_node(x, send_t.tolist(), recv), FlatAllToAll(world)(x, send_t.tolist(), recv))
    if rank in (1, 3):
        hier = HierarchicalAllToAll(sub, topo)
        assert hier.layout.describe() == "2 nodes x 1 rank"
        _check_case(FlatAllToAll(sub), hier, dist.get_rank(sub), 2, 7, 0.3, torch.float32, (4, ))
    dist.barrier()
    return True


def test_four_ranks_as_1x4_2x2_4x1():
    assert run_distributed(check_all, 4, (4, 2, 1), list(range(8)), timeout=120) == [(24, True)] * 4


def test_eight_ranks_as_2x4():
    assert run_distributed(check_transports, 8, (4, ), [11, 12, 13], timeout=150) == [3] * 8
