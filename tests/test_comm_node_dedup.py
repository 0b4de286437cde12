"""Node-level dedup in the hierarchical all-to-all (tiers 1 and 3).

Transport: rows routed like MoE tokens (each token to a random set of ranks, rank-major, token order) are
delivered exactly as by the flat exchange; the reverse exchange and the gradients agree with flat's after the
per-token sum the combine does; a dedup plan never sends more inter-node rows, and fewer when tokens hit two
ranks of a remote node. Layer: PiperMoE with node_dedup equals the flat transport (outputs and gradients).
4 gloo ranks as 2x2, 1x4, 4x1; 8 ranks as 2x4.
"""
import pytest
import torch
import torch.distributed as dist

from piper_ds.comm.alltoall import FlatAllToAll
from piper_ds.comm.hier_dedup import DedupPlan
from piper_ds.comm.hierarchical import HierarchicalAllToAll
from piper_ds.comm.topology import Topology
from piper_ds.comm.transports import make_transport
from piper_ds.moe.config import MoEConfig
from piper_ds.testing import run_distributed

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _routing(seed, rank, W, T, p):
    """Rows of T tokens to the ranks each token hits (prob. p): (send_counts [W], token of every row)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    hit_WT = torch.rand(W, T, generator=g) < p
    return hit_WT.sum(1), torch.nonzero(hit_WT)[:, 1]


def _per_token(rows, ids, T):
    return torch.zeros((T, ) + rows.shape[1:], dtype=torch.float64).index_add_(0, ids, rows.double())


def _check_case(flat, hier, rank, W, seed, T, p, dtype):
    send_t, ids = _routing(seed, rank, W, T, p)
    plan = hier.plan(send_t, source_ids=ids)
    send, recv = send_t.tolist(), list(plan.recv_counts)
    assert recv == flat.exchange_counts(send_t).tolist()
    g = torch.Generator().manual_seed(77 * seed + rank)
    x = torch.randn(T, 3, generator=g, dtype=torch.float64).to(dtype)[ids]  # equal ids carry equal rows
    w = torch.randn(sum(recv), 3, generator=g, dtype=torch.float64).to(dtype)
    outs = []
    for t, kw in ((flat, {}), (hier, {"plan": plan})):
        xr = x.clone().requires_grad_(True)
        y = t(xr, send, recv, **kw)
        y.backward(w)
        yr = w.clone().requires_grad_(True)  # the combine direction, and its backward (the fan-out)
        back = t(yr, recv, send, **({"plan": plan.reversed()} if kw else {}))
        back.backward(x)
        outs.append((y.detach(), xr.grad, back.detach(), yr.grad))
    (y0, gx0, b0, gy0), (y1, gx1, b1, gy1) = outs
    assert torch.equal(y0, y1), f"dispatch rows differ ({hier}, seed {seed})"
    assert torch.equal(gy0, gy1), f"combine gradient differs ({hier}, seed {seed})"
    tol = TOL[dtype]
    for a, b, what in ((gx0, gx1, "dispatch gradient"), (b0, b1, "combine")):
        assert torch.allclose(_per_token(a, ids, T), _per_token(b, ids, T), rtol=tol, atol=tol), what
    base = plan.without_dedup()
    return plan.inter_node_rows(), base.inter_node_rows(), isinstance(plan, DedupPlan)


def check_transport(rank, world_size, per_node_options, seeds):
    world = dist.group.WORLD
    flat = FlatAllToAll(world)
    out = {}
    for per_node in per_node_options:
        hier = HierarchicalAllToAll(world, Topology(world_size, per_node), node_dedup=True)
        rows = []
        for k, seed in enumerate(seeds):
            T = (0, 1, 7, 12)[k % 4] if rank != 1 else (5, 0, 3, 9)[k % 4]  # tokens per rank vary, some none
            p = (0.0, 0.4, 0.8, 1.0)[(k + rank) % 4]
            dtype = (torch.float64, torch.float32, torch.bfloat16)[k % 3]
            rows.append(_check_case(flat, hier, rank, world_size, seed, T, p, dtype))
        out[per_node] = rows
    return out


def _totals(results, per_node):
    """(inter-node rows with dedup, without) over all ranks and cases; whether the plans were dedup plans."""
    rows = [r for res in results for r in res[per_node]]
    return sum(r[0] for r in rows), sum(r[1] for r in rows), {r[2] for r in rows}


def _check_four_rank_rows(res):
    for rank_res in res:
        for per_node, rows in rank_res.items():
            assert all(d <= b for d, b, _ in rows), (per_node, rows)
    dedup, plain, kinds = _totals(res, 2)
    assert dedup < plain and kinds == {True}, (dedup, plain, kinds)  # 2x2: tokens hit both ranks of a node
    assert _totals(res, 4)[:2] == (0, 0)  # one node: nothing crosses
    dedup, plain, kinds = _totals(res, 1)
    assert dedup == plain and kinds == {False}  # one rank per node: one row per (token, node) already


def test_transport_eight_ranks_2x4():
    res = run_distributed(check_transport, 8, (4, ), [21, 22, 23], timeout=180)
    dedup, plain, _ = _totals(res, 4)
    assert dedup < plain, (dedup, plain)


def test_row_map_adjoint():
    """<fan-out(v), z> == <v, sum(z)> in fp64, with repeated and missing targets; groups sum in z order."""
    from piper_ds.comm.hier_dedup import RowMap
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([2, 0, 2, 1, 2, 0])
    groups = ((torch.tensor([0, 1, 3]), index[[0, 1, 3]]), (torch.tensor([2, 5]), index[[2, 5]]),
              (torch.tensor([4]), index[[4]]))
    fwd = RowMap("v", "z", index, groups, covering=True)
    v, z = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    bufs = {"v": v, "z": torch.empty(6, 4, dtype=torch.float64)}
    fwd.apply(bufs)
    assert torch.equal(bufs["z"], v[index])
    assert fwd.reversed().reversed() == fwd
    back = {"v": torch.empty(3, 4, dtype=torch.float64), "z": z}
    fwd.reversed().apply(back)
    want = torch.zeros(3, 4, dtype=torch.float64).index_add_(0, index, z)
    assert torch.allclose(back["v"], want, rtol=0, atol=1e-12)
    assert torch.allclose((bufs["z"] * z).sum(), (v * back["v"]).sum(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------- layer
D, F, E = 8, 12, 8
TOKENS = [9, 0, 6, 13]


def layer_worker(rank, world_size, dtype):
    from piper_ds.moe import PiperMoE
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(t, D, generator=gen, dtype=torch.float64).to(dtype) for t in TOKENS]
    gs = [torch.randn(t, D, generator=gen, dtype=torch.float64).to(dtype) for t in TOKENS]
    cfg = dict(top_k=4, n_shared_experts=1)  # 2 experts per rank: a token's 4 experts often share a node
    torch.manual_seed(0)
    weights = PiperMoE(D, E, F, ep_size=world_size, config=cfg).state_dict()
    out, rows, variants = {}, {}, [("flat", 4, False, "auto"), ("hierarchical", 2, True, "auto"),
                         ("hierarchical", 2, True, "reference"), ("auto", 1, True, "auto"),
                         ("auto", 4, True, "auto")]
    for kind, per_node, dedup, kernels in variants:
        layer = PiperMoE(D, E, F, ep_size=world_size, config=dict(cfg, transport=kind, node_dedup=dedup,
                                                                   kernels=kernels)).to(dtype)
        layer.load_state_dict(weights)
        layer.bind_ep_group(dist.group.WORLD, topology=Topology(world_size, per_node))
        transport = layer.deepspeed_moe.dispatcher.transport
        assert transport.capabilities.node_dedup == (dedup and per_node < world_size)
        if transport.capabilities.node_dedup:
            transport.plan = _recording(transport.plan, rows, (kind, per_node, kernels))
        x = xs[rank].clone().requires_grad_(True)
        y, l_aux, _ = layer(x)
        ((y * gs[rank]).sum() + l_aux).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        out[kind, per_node, kernels] = (y.detach(), x.grad, grads)
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    base_y, base_xg, base_grads = out["flat", 4, "auto"]
    for key, (y, xg, grads) in out.items():
        assert torch.allclose(y, base_y, rtol=tol, atol=tol), f"output differs for {key}"
        assert torch.allclose(xg, base_xg, rtol=tol, atol=tol), f"input gradient differs for {key}"
        assert grads.keys() == base_grads.keys()
        for n, g in grads.items():
            assert torch.allclose(g, base_grads[n], rtol=tol, atol=tol), f"gradient of {n} differs for {key}"
    return len(out), rows


def _recording(plan_fn, rows, key):
    """plan_fn that also records (inter-node rows with dedup, without) of every plan it makes."""
    def plan(*args, **kwargs):
        p = plan_fn(*args, **kwargs)
        rows[key] = (p.inter_node_rows(), p.without_dedup().inter_node_rows())
        return p
    return plan


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_moe_layer_node_dedup_equals_flat(dtype):
    res = run_distributed(layer_worker, 4, dtype, timeout=180)
    assert [n for n, _ in res] == [5] * 4
    for key in (("hierarchical", 2, "auto"), ("hierarchical", 2, "reference"), ("auto", 1, "auto")):
        dedup, plain = (sum(r[key][k] for _, r in res) for k in (0, 1))
        assert dedup <= plain, (key, dedup, plain)
        if key[1] == 2:  # 2x2, top-4 of 8 experts on 4 ranks: tokens hit both ranks of the other node
            assert dedup < plain, (key, dedup, plain)


# ------------------------------------------------------------------------------------- configuration
def test_bad_config_names_the_values():
    with pytest.raises(ValueError, match=r"node_dedup \(True\) needs transport 'hierarchical' or 'auto'.*'flat'"):
        MoEConfig(node_dedup=True, transport="flat")
    with pytest.raises(ValueError, match=r"node_dedup \(True\).*'flat'"):
        make_transport("flat", None, node_dedup=True)
    assert MoEConfig(node_dedup=True).transport == "auto"


def errors_worker(rank, world_size):
    hier = HierarchicalAllToAll(dist.group.WORLD, Topology(world_size, 2), node_dedup=True)
    send = torch.ones(world_size, dtype=torch.int64)
    msgs = []
    for kwargs in ({}, {"source_ids": torch.zeros(3, dtype=torch.int64)},
                   {"source_ids": torch.full((world_size, ), -1)}):
        try:
            hier.plan(send, **kwargs)
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def check_all(rank, world_size, per_node_options, seeds):
    return check_transport(rank, world_size, per_node_options, seeds), errors_worker(rank, world_size)


def test_transport_four_ranks_2x2_1x4_4x1_and_errors():
    res = run_distributed(check_all, 4, (2, 4, 1), list(range(8)), timeout=180)
    _check_four_rank_rows([r for r, _ in res])
    msgs = res[0][1]
    assert "needs source_ids" in msgs[0]
    assert "vector of 4 ids" in msgs[1] and "(3,)" in msgs[1]
    assert "min -1" in msgs[2]


def test_bench_routed_rows():
    """The benchmark's MoE-like rows: topk distinct ranks per token, rank-major, token order within a rank."""
    from piper_ds.bench.alltoall import routed_rows
    send, ids = routed_rows(40, 4, 3, torch.Generator().manual_seed(0))
    assert sum(send) == len(ids) == 13 * 3
    assert torch.bincount(ids).tolist() == [3] * 13
    start = 0
    for c in send:
        block = ids[start:start + c]
        assert torch.equal(block, block.sort().values) and block.unique().numel() == c
        start += c
