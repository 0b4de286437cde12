"""Tier 1: the hierarchical all-to-all plan, executed by an in-process simulator for every rank at once.

No processes: each rank's plan is built from a global count matrix, and the simulator delivers every stage's
messages between ranks (checking both ends agree on their sizes) — the wire-level proof of the algorithm.
"""
import random

import pytest
import torch

from piper_ds.comm.hier_plan import build_plan, lane_vector_for, lanes_from_counts_exchange
from piper_ds.comm.topology import GroupLayout


def _lanes(layout, C, me):
    """lane[m][j] = C[(m, i) -> (n, j)] as the final receivers would report it."""
    n, i = layout.coords(me)
    cols = {j: lane_vector_for(layout, me, [C[g][layout.members[n][j]] for g in range(layout.size)])
            for j in range(layout.local_size)}
    return [[cols[j][m] for j in range(layout.local_size)] for m in range(layout.num_nodes)]


def _plans(layout, C):
    W = layout.size
    return [build_plan(layout, g, C[g], [C[s][g] for s in range(W)], _lanes(layout, C, g)) for g in range(W)]


def _gather(bufs, blocks):
    parts = [bufs[b][s:s + n] for b, s, n in blocks]
    return torch.cat(parts) if parts else bufs["x"][:0]


def _scatter(bufs, blocks, data):
    k = 0
    for b, s, n in blocks:
        bufs[b][s:s + n] = data[k:k + n]
        k += n


def simulate(plans, xs):
    """Runs every rank's plan; returns the outputs (y per rank) and staging buffers (z per rank)."""
    bufs = [{"x": x, "y": torch.full((p.out_rows, ) + x.shape[1:], float("nan"), dtype=x.dtype),
             "z": torch.full((p.z_rows, ) + x.shape[1:], float("nan"), dtype=x.dtype)} for p, x in zip(plans, xs)]
    for k in range(len(plans[0].stages)):
        mail = {}
        for p, b in zip(plans, bufs):
            assert len(p.stages) == len(plans[0].stages)
            for m in p.stages[k].sends:
                assert (p.me, m.peer) not in mail, "two messages for one pair in one stage"
                mail[p.me, m.peer] = _gather(b, m.blocks)
        for p, b in zip(plans, bufs):
            for m in p.stages[k].recvs:
                data = mail.pop((m.peer, p.me))
                assert data.shape[0] == m.rows, (p.me, m.peer, data.shape[0], m.rows)
                _scatter(b, m.blocks, data)
        assert all(v.shape[0] == 0 for v in mail.values()), f"unreceived messages {list(mail)}"
    return [b["y"] for b in bufs], [b["z"] for b in bufs]


def _random_counts(W, rng, zeros=0.3, high=5):
    return [[0 if rng.random() < zeros else rng.randint(1, high) for _ in range(W)] for _ in range(W)]


def _payload(C):
    """x of rank g: rows (g, h, k) for each destination h, k < C[g][h], as float64 [S, 3]."""
    W = len(C)
    return [torch.tensor([[g, h, k] for h in range(W) for k in range(C[g][h])], dtype=torch.float64).view(-1, 3)
            for g in range(W)]


def _expected(C):
    W = len(C)
    return [torch.tensor([[s, g, k] for s in range(W) for k in range(C[s][g])], dtype=torch.float64).view(-1, 3)
            for g in range(W)]


LAYOUTS = {
    "1x4": [0, 0, 0, 0],
    "2x2": [0, 0, 1, 1],
    "4x1": [0, 1, 2, 3],
    "2x4": [0, 0, 0, 0, 1, 1, 1, 1],
    "3x2 interleaved": [7, 3, 5, 7, 3, 5],
    "4x3 shuffled": [2, 0, 1, 3, 2, 0, 3, 1, 1, 2, 0, 3],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_plan_equals_alltoall_and_reverse_restores_input(name):
    nodes = LAYOUTS[name]
    layout = GroupLayout.build(list(range(len(nodes))), nodes)
    rng = random.Random(len(nodes))
    for trial in range(6):
        C = _random_counts(layout.size, rng, zeros=[0.0, 0.3, 0.7, 1.0, 0.3, 0.5][trial])
        plans = _plans(layout, C)
        ys, _ = simulate(plans, _payload(C))
        for y, e in zip(ys, _expected(C)):
            assert torch.equal(y, e)
        back, _ = simulate([p.reversed() for p in plans], ys)
        for b, x in zip(back, _payload(C)):
            assert torch.equal(b, x)


@pytest.mark.parametrize("name", ["2x2", "2x4", "3x2 interleaved", "4x3 shuffled"])
def test_counts_exchange_yields_receive_counts_and_lanes(name):
    nodes = LAYOUTS[name]
    layout = GroupLayout.build(list(range(len(nodes))), nodes)
    W, N, L = layout.size, layout.num_nodes, layout.local_size
    C = _random_counts(W, random.Random(5), high=9)
    ones = [1] * W
    cplans = [build_plan(layout, g, ones, ones, [[1] * L for _ in range(N)]) for g in range(W)]
    ys, zs = simulate(cplans, [torch.tensor(C[g], dtype=torch.float64).view(W, 1) for g in range(W)])
    for g in range(W):
        assert ys[g].view(-1).tolist() == [C[s][g] for s in range(W)]
        lane = lanes_from_counts_exchange(cplans[g], [int(v) for v in zs[g].view(-1).tolist()])
        n = layout.coords(g)[0]
        want = _lanes(layout, C, g)
        assert [lane[m] for m in range(N) if m != n] == [want[m] for m in range(N) if m != n]


def test_message_pattern_is_one_packed_message_per_lane():
    layout = GroupLayout.build(list(range(8)), LAYOUTS["2x4"])
    C = [[3] * 8 for _ in range(8)]
    for p in _plans(layout, C):
        intra, inter = p.messages_sent()
        assert inter == 1, "one message per (node, peer node) lane"
        assert intra == 3 + 3, "phase I and phase III, to each other local rank"
        assert p.inter_node_rows() == 4 * 3, "rows crossing nodes are those of the flat exchange"
        assert layout.coords(p.stages[0].sends[-1].peer)[1] == layout.coords(p.me)[1], "rail-aligned lane"


def test_two_nodes_need_no_packing():
    layout = GroupLayout.build(list(range(8)), LAYOUTS["2x4"])
    C = _random_counts(8, random.Random(1))
    for p in _plans(layout, C):
        for stage in p.stages:
            for m in stage.sends + stage.recvs:
                assert len(m.runs()) <= 1, (p.me, stage.name, m)


def test_bad_counts_and_missing_lanes_name_values():
    layout = GroupLayout.build([0, 1, 2, 3], LAYOUTS["2x2"])
    with pytest.raises(ValueError, match="send_counts has 3 entries, the group has 4"):
        build_plan(layout, 0, [1, 1, 1], [1] * 4, [[1, 1], [1, 1]])
    with pytest.raises(ValueError, match="non-negative"):
        build_plan(layout, 0, [1, -1, 1, 1], [1] * 4, [[1, 1], [1, 1]])
    with pytest.raises(ValueError, match="needs lane counts"):
        build_plan(layout, 0, [1] * 4, [1] * 4, None)
