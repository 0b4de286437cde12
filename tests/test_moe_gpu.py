"""PiperMoE on CUDA (bf16 grouped GEMM path) against the fp32 dense reference. Runs on the GPU machine."""
import copy
import math

import pytest
import torch

from piper_ds.moe import PiperMoE
from piper_ds.ops import reference as R

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tokens, E, k, d, f", [(1000, 64, 6, 256, 176), (37, 8, 2, 136, 200), (0, 16, 4, 128, 64),
                                                (4096, 256, 8, 512, 96)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_cuda_bf16_layer_matches_reference(tokens, E, k, d, f, activation):
    torch.manual_seed(tokens + E)
    layer = PiperMoE(d, E, f, top_k=k, activation=activation, n_shared_experts=1).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, l_aux, _ = layer(x)
    core = layer.deepspeed_moe
    g = R.gating_reference(x.detach().float() @ core.gate.wg.weight.float().t(), k)
    e = core.experts
    ref = R.moe_reference(x.detach().float(), g.topk_idx_TK, g.topk_weights_TK, e.w1.float(), e.w2.float(),
                          e.w3.float() if activation == "swiglu" else None)
    ref = ref + copy.deepcopy(layer.shared_mlp).float()(x.detach().float())
    if tokens:
        assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2
    (y.float().square().sum() + l_aux).backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert torch.isfinite(e.w_up.grad).all() and (tokens == 0 or e.w_up.grad.abs().sum() > 0)


def _layer_and_input(tokens=2048, d=256, E=16, k=4, f=128, **cfg):
    torch.manual_seed(7)
    layer = PiperMoE(d, E, f, top_k=k, **cfg).cuda().to(torch.bfloat16)
    return layer, torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)


@pytest.mark.parametrize("cfg", [dict(), dict(n_shared_experts=2), dict(capacity_factor=1.0),
                                 dict(activation="gelu", bias_update_rate=1e-3)])
def test_ep1_layer_never_waits_for_the_device(cfg):
    """At ep_size 1 the forward and backward make no device-to-host synchronisation at all."""
    layer, x = _layer_and_input(**cfg)
    y, l_aux, _ = layer(x)  # first call: builds the ops, warms the caches
    (y.float().square().mean() + l_aux).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, l_aux, _ = layer(x)
        (y.float().square().mean() + l_aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_capacity_layer_matches_reference_with_drops():
    layer, x = _layer_and_input(capacity_factor=0.8)
    y, _, _ = layer(x)
    core, cfg = layer.deepspeed_moe, layer.config
    g = R.gating_reference(x.detach().float() @ core.gate.wg.weight.float().t(), cfg.top_k)
    capacity = math.ceil(0.8 * x.shape[0] * cfg.top_k / layer.num_experts)
    idx = R.capacity_drop_reference(g.topk_idx_TK, layer.num_experts, capacity)
    assert int(layer.last_stats["dropped"]) == int((idx < 0).sum()) > 0
    e = core.experts
    ref = R.moe_reference(x.detach().float(), idx, g.topk_weights_TK, e.w1.float(), e.w2.float(), e.w3.float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("cfg", [dict(n_shared_experts=1), dict(capacity_factor=1.25, bias_update_rate=1e-3)])
def test_cuda_graph_layer_equals_eager(cfg):
    eager, x = _layer_and_input(**cfg)
    graphed = copy.deepcopy(eager)
    graphed.config = graphed.config.model_copy(update=dict(cuda_graph=True))
    from piper_ds.moe.graphed import GraphedLayer
    graphed._graphed = GraphedLayer(graphed)
    for step in range(3):  # fresh inputs every step: the graph copies them into its static input
        x = torch.randn_like(x).requires_grad_(True)
        g = torch.randn_like(x)
        outs = []
        for layer in (eager, graphed):
            for p in layer.parameters():
                p.grad = None
            xi = x.detach().clone().requires_grad_(True)
            y, l_aux, counts = layer(xi)
            torch.autograd.backward([y, l_aux], [g, torch.ones_like(l_aux)])
            outs.append((y.detach().clone(), l_aux.detach(), counts, xi.grad,
                         {n: p.grad.clone() for n, p in layer.named_parameters()}))
        (ye, le, ce, xe, ge), (yg, lg, cg, xg, gg) = outs
        torch.testing.assert_close(yg, ye, rtol=1e-3, atol=1e-3, msg=f"output, step {step}")
        torch.testing.assert_close(lg, le, msg=f"aux loss, step {step}")
        assert torch.equal(cg, ce), step
        torch.testing.assert_close(xg, xe, rtol=1e-3, atol=1e-3, msg=f"input grad, step {step}")
        for n in ge:
            torch.testing.assert_close(gg[n], ge[n], rtol=1e-3, atol=1e-3, msg=f"grad {n}, step {step}")
    torch.testing.assert_close(graphed.deepspeed_moe.gate.pending_load, eager.deepspeed_moe.gate.pending_load)
    graphed(x)  # a forward whose backward has not run ...
    with pytest.raises(RuntimeError, match="forward called again before the previous forward's backward"):
        graphed(x)
    graphed.eval()
    with torch.no_grad():  # eval runs eagerly
        torch.testing.assert_close(graphed(x)[0], eager.eval()(x)[0], rtol=1e-3, atol=1e-3)
