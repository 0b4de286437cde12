"""Tier 3: the MoE layer gives bit-identical outputs and gradients with the flat and hierarchical transports.

4 gloo ranks seen as 1x4 (flat), 2x2 and 4x1 (hierarchical) and 2x2 with transport "auto" (which must pick the
hierarchical one); uneven tokens per rank, one rank without tokens. The dispatcher factory picks the flat or the
planned dispatcher from the transport's declared capabilities; the hierarchical one with a timeline's exchange
timer attached (as the pipeline's timeline does) computes the same and records its exchanges.
"""
import pytest
import torch
import torch.distributed as dist

from piper_ds.comm.alltoall import FlatAllToAll
from piper_ds.comm.hierarchical import HierarchicalAllToAll
from piper_ds.comm.topology import Topology
from piper_ds.testing import run_distributed

D, F, E = 8, 12, 8
TOKENS = [9, 0, 6, 13]
VARIANTS = [("flat", 4), ("hierarchical", 2), ("hierarchical", 1), ("auto", 2), ("auto", 4), ("timed", 2)]


def moe_worker(rank, world_size):
    from piper_ds.moe import PiperMoE
    from piper_ds.moe.dispatcher import FlatDispatcher, PlannedDispatcher
    from piper_ds.pipeline.timeline import ExchangeTimeline, TimelineRecorder
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(t, D, generator=gen) for t in TOKENS]
    gs = [torch.randn(t, D, generator=gen) for t in TOKENS]
    cfg = dict(top_k=3, n_shared_experts=1)
    torch.manual_seed(0)
    weights = PiperMoE(D, E, F, ep_size=world_size, config=cfg).state_dict()
    out = {}
    for kind, per_node in VARIANTS:
        transport = "hierarchical" if kind == "timed" else kind
        layer = PiperMoE(D, E, F, ep_size=world_size, config=dict(cfg, transport=transport))
        layer.load_state_dict(weights)
        layer.bind_ep_group(dist.group.WORLD, topology=Topology(world_size, per_node))
        flat = kind == "flat" or per_node == world_size
        dispatcher = layer.deepspeed_moe.dispatcher
        assert type(dispatcher) is (FlatDispatcher if flat else PlannedDispatcher), (kind, per_node, dispatcher)
        assert type(dispatcher.transport) is (FlatAllToAll if flat else HierarchicalAllToAll), (kind, per_node)
        rec = TimelineRecorder(cuda=False)
        if kind == "timed":
            dispatcher.timer = ExchangeTimeline(rec)
            rec.begin_step()
        x = xs[rank].clone().requires_grad_(True)
        y, l_aux, _ = layer(x)
        ((y * gs[rank]).sum() + l_aux).backward()
        if kind == "timed":
            rec.end_step()
            a2a = [iv for iv in rec.intervals() if iv["kind"] == "a2a"]
            assert len(a2a) == 1 + 2 * 3, a2a  # the plan's counts; rows, metadata, outputs both ways
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        out[kind, per_node] = (y.detach(), x.grad, grads)
    # overlap_chunks cannot apply when "auto" picks the hierarchical transport: said, not silently dropped
    chunked = PiperMoE(D, E, F, ep_size=world_size, config=dict(cfg, overlap_chunks=2))
    with pytest.warns(UserWarning, match="overlap_chunks=2 is not used"):
        chunked.bind_ep_group(dist.group.WORLD, topology=Topology(world_size, 2))
    base_y, base_xg, base_grads = out["flat", 4]
    for key, (y, xg, grads) in out.items():
        assert torch.equal(y, base_y), f"output differs for {key}"
        assert torch.equal(xg, base_xg), f"input gradient differs for {key}"
        assert grads.keys() == base_grads.keys()
        for n, g in grads.items():
            assert torch.equal(g, base_grads[n]), f"gradient of {n} differs for {key}"
    return len(out)


def test_moe_layer_same_with_either_transport():
    assert run_distributed(moe_worker, 4, timeout=180) == [len(VARIANTS)] * 4
