"""PiperMoE on CUDA (bf16 grouped GEMM path) against the fp32 dense reference. Runs on the GPU machine."""
import copy

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
    assert torch.isfinite(e.w1.grad).all() and (tokens == 0 or e.w1.grad.abs().sum() > 0)
