"""CUDA kernels of the fused router and the fan-index row movement against the references (tier 5, GPU only;
the plans', rows' and activation's CUDA cases live beside their CPU cases in test_ops_permute / test_ops_experts).

Every test is marked ``gpu``: on a machine without CUDA they are skipped with a visible reason (conftest.py).
The CUDA ops are JIT-built on first use (sm_90 + compute_90 PTX).
"""
from __future__ import annotations

import pytest
import torch

from piper_ds.ops import expand_rows, fused_gating, reduce_rows
from piper_ds.ops.reference import expand_rows_reference, gating_reference, reduce_rows_reference
from test_ops_gating import assert_gating_equal, distinct_logits, random_bias
from test_ops_permute import fan_index

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the GPU machine")]
DEV = "cuda"

GATING_CASES = [  # T, E, K, score_func, n_groups, topk_groups, bias, normalize, scaling, dtype
    (0, 16, 2, "softmax", 1, 1, False, True, 1.0, torch.float32),
    (1, 1, 1, "sigmoid", 1, 1, True, True, 1.0, torch.float32),
    (17, 7, 7, "softmax", 1, 1, False, True, 1.0, torch.float32),
    (4099, 256, 8, "sigmoid", 8, 4, True, True, 2.5, torch.bfloat16),
    (2053, 64, 6, "softmax", 1, 1, False, True, 1.0, torch.bfloat16),
    (333, 100, 5, "sigmoid", 10, 3, True, False, 1.5, torch.float32),
    (250, 96, 3, "softmax", 8, 2, True, True, 1.0, torch.float16),
    (129, 256, 8, "sigmoid", 32, 4, True, True, 2.5, torch.float32),
    (77, 1000, 8, "softmax", 8, 3, True, True, 1.0, torch.float32),
    (61, 130, 2, "sigmoid", 2, 1, True, True, 1.0, torch.float64),
    (300, 48, 8, "softmax", 4, 2, True, False, 1.0, torch.float32),
    (45, 32, 8, "sigmoid", 32, 8, True, True, 1.0, torch.bfloat16),
]


@pytest.mark.parametrize("T,E,K,score_func,G,TG,use_bias,normalize,scaling,dtype", GATING_CASES)
def test_gating_cuda_equals_reference(T, E, K, score_func, G, TG, use_bias, normalize, scaling, dtype):
    logits = distinct_logits(T, E, dtype, seed=T + E, device=DEV)
    bias = random_bias(E, device=DEV) if use_bias else None
    out = fused_gating(logits, K, score_func, bias, G, TG, normalize, scaling, backend="cuda")
    assert out.topk_idx_TK.is_cuda
    assert_gating_equal(out, gating_reference(logits, K, score_func, bias, G, TG, normalize, scaling))


@pytest.mark.parametrize("K", range(1, 9))
def test_gating_cuda_every_k(K):
    logits = distinct_logits(1000, 256, torch.bfloat16, seed=K, device=DEV)
    bias = random_bias(256, seed=K, device=DEV)
    out = fused_gating(logits, K, "sigmoid", bias, 8, 4, True, 2.5, backend="cuda")
    assert_gating_equal(out, gating_reference(logits, K, "sigmoid", bias, 8, 4, True, 2.5))


def test_gating_cuda_matches_cpu_op_on_continuous_logits():
    logits = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))
    bias = random_bias(256)
    gpu = fused_gating(logits.to(DEV), 8, "sigmoid", bias.to(DEV), 8, 4, True, 2.5, backend="cuda")
    cpu = fused_gating(logits, 8, "sigmoid", bias, 8, 4, True, 2.5, backend="cpu")  # the CUDA build's CPU path
    assert_gating_equal(gpu, type(cpu)(*(t.to(DEV) for t in cpu)))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_gating_cuda_gradients(score_func):
    base = distinct_logits(513, 64, seed=4, device=DEV)
    bias = random_bias(64, device=DEV)
    gw, gs = torch.randn(513, 6, device=DEV), torch.randn(513, 64, device=DEV)
    grads = []
    for backend in ("cuda", "reference"):
        x = base.clone().requires_grad_()
        out = fused_gating(x, 6, score_func, bias, 8, 3, True, 2.0, backend=backend)
        ((out.topk_weights_TK * gw).sum() + (out.scores_TE * gs).sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    x = distinct_logits(5, 16, torch.float64, seed=2, device=DEV).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: fused_gating(t, 3, score_func, bias[:16].double(), 4, 2, True, 1.5, backend="cuda")[1:3], (x,))


@pytest.mark.parametrize("T,E,dtype", [(0, 64, torch.float32), (1, 64, torch.bfloat16), (2053, 64, torch.bfloat16),
                                       (777, 96, torch.float32), (129, 256, torch.float16)])
@pytest.mark.parametrize("use", ["both", "weights", "scores"])
def test_gating_cuda_autograd_node(T, E, dtype, use):
    """The C++ autograd node: gradients of either or both outputs, zero tokens, dtypes; counts start from zero."""
    base = distinct_logits(T, E, dtype, seed=T + 3, device=DEV)
    bias = random_bias(E, device=DEV)
    gw, gs = torch.randn(T, 6, device=DEV), torch.randn(T, E, device=DEV)
    grads, outs = [], []
    for backend in ("cuda", "reference"):
        x = base.clone().requires_grad_()
        out = fused_gating(x, 6, "softmax", bias, 4, 2, True, 1.5, backend=backend)
        outs.append(out)
        loss = (out.topk_weights_TK * gw).sum() * (use != "scores") + (out.scores_TE * gs).sum() * (use != "weights")
        loss.backward()
        grads.append(x.grad)
    assert_gating_equal(outs[0], outs[1])
    assert outs[0].topk_weights_TK.grad_fn is not None and outs[0].topk_idx_TK.grad_fn is None
    assert grads[0].dtype == dtype and grads[0].shape == (T, E)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grads[0].float(), grads[1].float(), **tol)
    again = fused_gating(base.clone().requires_grad_(), 6, "softmax", bias, 4, 2, True, 1.5, backend="cuda")
    assert torch.equal(again.tokens_per_expert_E, outs[1].tokens_per_expert_E)  # not accumulated across calls
    with torch.no_grad():  # no graph: the plain forward, same results
        assert_gating_equal(fused_gating(base, 6, "softmax", bias, 4, 2, True, 1.5, backend="cuda"), outs[1])


def test_fan_rows_cuda_gradcheck_float64():
    pos = fan_index(9, 3, 30, seed=1, device=DEV)
    x = torch.randn(9, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    y = torch.randn(30, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.rand(9, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    covered = torch.zeros(30, dtype=torch.bool, device=DEV)
    covered[pos[pos >= 0]] = True
    # rows no pair points at are left unwritten on CUDA: compare only the covered ones
    assert torch.autograd.gradcheck(lambda t: expand_rows(t, pos, 30, backend="cuda")[covered], (x, ))
    assert torch.autograd.gradcheck(lambda a, b: reduce_rows(a, pos, b, backend="cuda"), (y, w))


def test_fan_rows_cuda_misaligned_views():
    """Contiguous rows that start 2 bytes past a 16-byte boundary take the scalar path of the kernels."""
    def misaligned(n, d):
        return torch.randn(n * d + 1, device=DEV, dtype=torch.bfloat16)[1:].view(n, d)
    pos = fan_index(40, 4, 200, seed=2, device=DEV)
    x, y = misaligned(40, 64), misaligned(200, 64)
    covered = torch.zeros(200, dtype=torch.bool, device=DEV)
    covered[pos[pos >= 0]] = True
    got = expand_rows(x, pos, 200, backend="cuda")
    assert torch.equal(got[covered], expand_rows_reference(x, pos, 200)[covered])
    torch.testing.assert_close(reduce_rows(y, pos, backend="cuda").float(), reduce_rows_reference(y, pos).float(),
                               rtol=1e-2, atol=1e-2)


def test_auto_backend_uses_the_cuda_ops():
    try:
        from piper_ds.op_builder import loader
    except ImportError:
        from op_builder import loader
    assert loader.get_op("gating", "cuda", "auto") is not None
    assert loader.get_op("permute", "cuda", "auto") is not None
    assert loader.get_op("activation", "cuda", "auto") is not None
    assert loader.get_op("gating", "cuda", "auto").has_cuda()


# ------------------------------------------------------------------------------------------------ Adam(W) step
def _adamw_run(backend, sizes, grad_dtype, lowp_dtype, decoupled, multiplier, step_on_device, steps=3):
    from piper_ds.ops.adamw import adamw_step
    gen = torch.Generator(device=DEV).manual_seed(sum(sizes) + steps)
    P = sum(sizes) + 5
    master = torch.randn(P, device=DEV, generator=gen)
    exp_avg, exp_avg_sq = torch.zeros_like(master), torch.zeros_like(master)
    lowp = None if lowp_dtype is None else torch.zeros(P, device=DEV, dtype=lowp_dtype)
    step = torch.zeros((), device=DEV if step_on_device else "cpu")
    for _ in range(steps):
        grads = [torch.randn(n, device=DEV, generator=gen).to(grad_dtype) for n in sizes]
        mult = torch.tensor(0.6, device=DEV) if multiplier else None
        step += 1
        adamw_step(grads, master, exp_avg, exp_avg_sq, lowp, step=step, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                   weight_decay=0.1, decoupled=decoupled, grad_multiplier=mult, backend=backend)
    return master, exp_avg, exp_avg_sq, lowp


ADAMW_CASES = [  # sizes (offsets that break 16-byte alignment included), grad dtype, lowp dtype, decoupled, mult
    ((4096, 3, (1 << 20) + 1, 0, 64), torch.bfloat16, torch.bfloat16, True, True),
    ((5, 4096, 7), torch.bfloat16, None, False, False),
    ((1 << 16,), torch.float16, torch.float16, True, False),
    ((33, 1 << 12), torch.float32, torch.float32, True, True),
    ((1,), torch.float32, torch.bfloat16, False, True),
]


@pytest.mark.parametrize("sizes,grad_dtype,lowp_dtype,decoupled,multiplier", ADAMW_CASES)
@pytest.mark.parametrize("step_on_device", [True, False])
def test_adamw_cuda_equals_reference(sizes, grad_dtype, lowp_dtype, decoupled, multiplier, step_on_device):
    got = _adamw_run("cuda", sizes, grad_dtype, lowp_dtype, decoupled, multiplier, step_on_device)
    want = _adamw_run("reference", sizes, grad_dtype, lowp_dtype, decoupled, multiplier, step_on_device)
    for name, g, w, tol in zip(("master", "exp_avg", "exp_avg_sq"), got, want,
                               (dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-5, atol=1e-7), dict(rtol=1e-5, atol=1e-9))):
        torch.testing.assert_close(g, w, **tol, msg=name)  # fp32 both; contraction into FMAs moves an ulp or so
    n = sum(sizes)
    if lowp_dtype is not None:  # the kernel's own master, rounded; the uncovered tail untouched
        assert torch.equal(got[3][:n], got[0][:n].to(lowp_dtype)) and not got[3][n:].any()


def test_auto_backend_uses_the_adamw_cuda_op():
    try:
        from piper_ds.op_builder import loader
    except ImportError:
        from op_builder import loader
    assert loader.get_op("adamw", "cuda", "auto").has_cuda()
