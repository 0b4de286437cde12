"""The fused router's C++ CPU op against gating_reference, and its autograd (tier 2, CPU).

Logits are drawn without ties inside a row (a random permutation of k/32, exact in bf16), so the top-k of the
op and of the reference must agree exactly: a tie is the only place where the two may legally differ.
"""
from __future__ import annotations

import pytest
import torch

from piper_ds.ops import fused_gating
from piper_ds.ops.reference import gating_reference
from test_ops_build import cpu_ops


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_ops()


def distinct_logits(T: int, E: int, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """[T, E] logits, each row a permutation of distinct multiples of 1/32 (no ties, exact in bf16)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(T, E, generator=g).argsort(dim=1)
    return ((perm - E // 2).to(torch.float64) / 32).to(dtype).to(device)


def random_bias(E: int, seed: int = 1, device="cpu") -> torch.Tensor:
    return (torch.rand(E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.1 - 0.05) \
        .float().to(device)


def assert_gating_equal(out, ref, atol=1e-6):
    assert torch.equal(out.topk_idx_TK, ref.topk_idx_TK)
    assert out.topk_idx_TK.dtype == out.tokens_per_expert_E.dtype == torch.int64
    torch.testing.assert_close(out.topk_weights_TK.to(ref.topk_weights_TK.dtype), ref.topk_weights_TK,
                               atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.scores_TE.to(ref.scores_TE.dtype), ref.scores_TE, atol=atol, rtol=1e-5)
    assert torch.equal(out.tokens_per_expert_E, ref.tokens_per_expert_E)


# T, E, K, score_func, n_groups, topk_groups, bias, normalize, scaling, dtype
CASES = [
    (0, 16, 2, "softmax", 1, 1, False, True, 1.0, torch.float32),
    (1, 8, 1, "softmax", 1, 1, False, True, 1.0, torch.float32),
    (1, 1, 1, "sigmoid", 1, 1, True, True, 1.0, torch.float32),
    (17, 7, 7, "softmax", 1, 1, False, True, 1.0, torch.float32),
    (37, 256, 8, "sigmoid", 8, 4, True, True, 2.5, torch.float32),
    (64, 64, 6, "softmax", 1, 1, False, True, 1.0, torch.bfloat16),
    (33, 100, 5, "sigmoid", 10, 3, True, False, 1.5, torch.float32),
    (50, 96, 3, "softmax", 8, 2, True, True, 1.0, torch.float16),
    (29, 256, 8, "sigmoid", 32, 4, True, True, 2.5, torch.bfloat16),
    (40, 250, 4, "softmax", 5, 2, False, True, 1.0, torch.float32),
    (13, 130, 2, "sigmoid", 2, 1, True, True, 1.0, torch.float64),
    (300, 48, 8, "softmax", 4, 2, True, False, 1.0, torch.float32),
    (23, 64, 8, "sigmoid", 64, 8, True, True, 1.0, torch.float32),  # groups of one expert
]


@pytest.mark.parametrize("T,E,K,score_func,G,TG,use_bias,normalize,scaling,dtype", CASES)
def test_cpu_op_equals_reference(T, E, K, score_func, G, TG, use_bias, normalize, scaling, dtype):
    logits = distinct_logits(T, E, dtype, seed=T * 1000 + E)
    bias = random_bias(E) if use_bias else None
    out = fused_gating(logits, K, score_func, bias, G, TG, normalize, scaling, backend="cpu")
    ref = gating_reference(logits, K, score_func, bias, G, TG, normalize, scaling)
    assert out.topk_weights_TK.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_gating_equal(out, ref)


@pytest.mark.parametrize("K", range(1, 9))
def test_every_k_with_groups_and_bias(K):
    logits = distinct_logits(45, 64, seed=K)
    bias = random_bias(64, seed=K)
    for score_func in ("softmax", "sigmoid"):
        out = fused_gating(logits, K, score_func, bias, 8, 4, True, 1.0, backend="cpu")
        assert_gating_equal(out, gating_reference(logits, K, score_func, bias, 8, 4, True, 1.0))


def test_continuous_random_logits():
    logits = torch.randn(200, 256, generator=torch.Generator().manual_seed(3))
    bias = random_bias(256)
    out = fused_gating(logits, 8, "sigmoid", bias, 8, 4, True, 2.5, backend="cpu")
    assert_gating_equal(out, gating_reference(logits, 8, "sigmoid", bias, 8, 4, True, 2.5))


@pytest.mark.parametrize("score_func,G,TG,normalize", [("softmax", 1, 1, True), ("sigmoid", 4, 2, True),
                                                       ("softmax", 4, 3, False), ("sigmoid", 1, 1, False)])
def test_gradcheck_float64(score_func, G, TG, normalize):
    logits = distinct_logits(4, 16, torch.float64, seed=7).requires_grad_()
    bias = random_bias(16).double()

    def f(x):
        out = fused_gating(x, 3, score_func, bias, G, TG, normalize, 1.7, backend="cpu")
        return out.topk_weights_TK, out.scores_TE

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("use", ["both", "weights", "scores"])
def test_gradients_match_reference_autograd(use):
    base = distinct_logits(31, 64, seed=11)
    bias = random_bias(64)
    g = torch.Generator().manual_seed(5)
    gw, gs = torch.randn(31, 6, generator=g), torch.randn(31, 64, generator=g)
    grads = []
    for fn in (lambda x: fused_gating(x, 6, "softmax", bias, 8, 3, True, 2.0, backend="cpu"),
               lambda x: gating_reference(x, 6, "softmax", bias, 8, 3, True, 2.0)):
        x = base.clone().requires_grad_()
        out = fn(x)
        loss = (out.topk_weights_TK * gw).sum() * (use != "scores") + (out.scores_TE * gs).sum() * (use != "weights")
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bias_gets_no_gradient_and_bf16_grads_keep_dtype():
    logits = distinct_logits(9, 32, torch.bfloat16).requires_grad_()
    bias = random_bias(32).requires_grad_()
    out = fused_gating(logits, 2, "sigmoid", bias, backend="cpu")
    out.topk_weights_TK.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and bias.grad is None


def test_backward_is_not_differentiable_twice():
    x = distinct_logits(6, 16).requires_grad_()
    out = fused_gating(x, 2, backend="cpu")
    gw = torch.randn(6, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(out.topk_weights_TK, x, gw, create_graph=True)
    out = fused_gating(x, 2, backend="cpu")  # create_graph with plain incoming gradients: first order works
    g, = torch.autograd.grad(out.topk_weights_TK, x, gw.detach(), create_graph=True)
    x2 = x.detach().clone().requires_grad_()
    torch.autograd.backward(gating_reference(x2, 2).topk_weights_TK, gw.detach())
    torch.testing.assert_close(g, x2.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=33), ValueError, "top_k"),
    (dict(top_k=2, n_groups=5), ValueError, "divisible by n_groups"),
    (dict(top_k=2, n_groups=4, topk_groups=5), ValueError, "topk_groups"),
    (dict(top_k=9, n_groups=4, topk_groups=1), ValueError, r"top_k \(9\)"),
    (dict(top_k=2, score_func="relu"), ValueError, "score_func"),
    (dict(top_k=2, bias=torch.zeros(31)), ValueError, "bias"),
])
def test_bad_arguments_raise_naming_the_values(kwargs, err, match):
    with pytest.raises(err, match=match):
        fused_gating(torch.randn(3, 32), backend="cpu", **kwargs)


def test_non_float_logits_raise_type_error():
    with pytest.raises(TypeError, match="floating"):
        fused_gating(torch.ones(3, 8, dtype=torch.int64), 2, backend="cpu")
    with pytest.raises(ValueError, match="2-D"):
        fused_gating(torch.randn(3, 8, 2), 2, backend="cpu")


def test_reference_backend_is_the_reference():
    logits = torch.randn(5, 16)
    out = fused_gating(logits, 2, backend="reference")
    ref = gating_reference(logits, 2)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
