"""The DeepSpeed AutoEP peer of the MoE layer benchmark (:mod:`piper_ds.bench.autoep_peer`): built on a plain
module, it computes the same MoE as the dense reference, at ep=1 and at ep=2 (gloo), and refuses what it
cannot compare like for like."""
import pytest
import torch

from piper_ds.bench.autoep_peer import AutoEPPeer
from piper_ds.testing import run_distributed

SHAPE = dict(d=48, f=40, E=8, k=3)


def test_autoep_peer_matches_the_dense_reference():
    peer = AutoEPPeer(SHAPE, dtype=torch.float32, device=torch.device("cpu"))
    x = torch.randn(37, SHAPE["d"], generator=torch.Generator().manual_seed(0), requires_grad=True)
    y, aux, counts = peer(x)
    assert aux is None and counts is None and y.shape == x.shape
    torch.testing.assert_close(y, peer.reference(x.detach()), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in peer.parameters())


def test_autoep_peer_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="activation 'gelu'"):
        AutoEPPeer(SHAPE, activation="gelu", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"num_experts \(8\) must be divisible by ep_size \(3\)"):
        AutoEPPeer(SHAPE, ep_size=3, dtype=torch.float32, device=torch.device("cpu"))
    peer = AutoEPPeer(SHAPE, dtype=torch.float32, device=torch.device("cpu"), keep_reference=False)
    with pytest.raises(ValueError, match="keep_reference=False"):
        peer.reference(torch.zeros(2, SHAPE["d"]))


def _ep2(rank, world_size):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    peer = AutoEPPeer(SHAPE, ep_size=world_size, ep_rank=rank, dtype=torch.float32, device=torch.device("cpu"))
    peer.set_deepspeed_parallelism()
    assert peer.layer.num_local_experts == SHAPE["E"] // world_size
    x = torch.randn(29 + 7 * rank, SHAPE["d"], generator=torch.Generator().manual_seed(rank))
    y = peer(x)[0]
    return (y - peer.reference(x)).abs().max().item()


def test_autoep_peer_at_ep2_matches_the_dense_reference():
    assert max(run_distributed(_ep2, 2, timeout=180)) < 1e-5
