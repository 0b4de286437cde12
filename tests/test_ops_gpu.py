"""CUDA kernels of the fused router and the dispatch permutation against the references (tier 5, GPU only).

Every test is marked ``gpu``: on a machine without CUDA they are skipped with a visible reason (conftest.py).
The CUDA ops are JIT-built on first use (sm_90 + compute_90 PTX).
"""
from __future__ import annotations

import pytest
import torch

from piper_ds.ops import combine_index, combine_rows, expand_plan, fused_gating, permute_rows, send_plan
from piper_ds.ops.permute import _pad_groups
from piper_ds.ops.reference import (combine_index_reference, combine_rows_reference, expand_plan_reference,
                                    gating_reference, permute_rows_reference, send_plan_reference)
from test_ops_gating import assert_gating_equal, distinct_logits, random_bias
from test_ops_permute import assert_plans_equal, masked_combine_reference, placement, routing, rows_index

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


@pytest.mark.parametrize("T,E,K,R", [(0, 8, 2, 2), (5, 8, 1, 1), (4097, 256, 8, 8), (1000, 64, 6, 4),
                                     (333, 9, 3, 3)])
def test_plans_cuda_equal_reference(T, E, K, R):
    idx, w = routing(T, E, K, seed=T, device=DEV)
    rank, slot = placement(E, R, seed=K, device=DEV)
    plan = send_plan(idx, w, rank, slot, R, backend="cuda")
    assert_plans_equal(plan, send_plan_reference(idx, w, rank, slot, R))
    L = (E + R - 1) // R
    for align in (1, 8, 128):
        exp = expand_plan(plan.slots_SK, plan.weights_SK, L, align=align, backend="cuda")
        ref = expand_plan_reference(plan.slots_SK, plan.weights_SK, L)
        assert_plans_equal(exp, _pad_groups(ref, align) if align > 1 else ref)
    # with the row counts given (the dispatcher's one-wait path): the same plans, no read-back
    known = send_plan(idx, w, rank, slot, R, backend="cuda", num_rows=plan.token_idx_S.numel())
    assert_plans_equal(known, plan)
    exp = expand_plan(plan.slots_SK, plan.weights_SK, L, backend="cuda")
    assert_plans_equal(expand_plan(plan.slots_SK, plan.weights_SK, L, backend="cuda",
                                   num_rows=exp.row_idx_N.numel()), exp)


def test_expand_cuda_many_chunks_and_errors():
    slots = torch.randint(-1, 200, (40000, 8), generator=torch.Generator().manual_seed(0)).to(DEV)
    w = torch.rand(40000, 8, device=DEV)
    assert_plans_equal(expand_plan(slots, w, 200, backend="cuda"), expand_plan_reference(slots, w, 200))
    with pytest.raises(ValueError, match="num_local"):
        expand_plan(slots, w, 100, backend="cuda")
    idx, wt = routing(10, 8, 2, drop=0.0, device=DEV)
    rank, slot = placement(8, 2, device=DEV)
    with pytest.raises(ValueError, match="ep_size"):
        send_plan(idx, wt, rank + 5, slot, 2, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 130, 2048])
def test_rows_cuda_equal_reference(dtype, D):
    x = torch.randn(301, D, device=DEV).to(dtype)
    index = rows_index(1003, 301, seed=D).to(DEV)
    want = permute_rows_reference(x, index.clamp_min(0)) * (index >= 0)[:, None].to(dtype)
    assert torch.equal(permute_rows(x, index, backend="cuda"), want)
    y = torch.randn(1003, D, device=DEV).to(dtype)
    w = torch.rand(1003, device=DEV)
    for weight in (None, w):
        out = combine_rows(y, index, 301, weight, backend="cuda")
        ref = masked_combine_reference(y, index, 301, weight)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype in (torch.float32, torch.float64) else {}
        torch.testing.assert_close(out, ref, **tol)
        assert torch.equal(out, combine_rows(y, index, 301, weight, backend="cuda"))  # deterministic


def test_rows_cuda_misaligned_views_and_large_fan_in():
    base = torch.randn(1001, 64, device=DEV, dtype=torch.bfloat16)
    x = base.view(-1)[3:3 + 1000 * 64].view(1000, 64)  # rows start 6 bytes off a 16-byte boundary
    index = rows_index(5000, 1000, seed=3, pad=False).to(DEV)
    assert torch.equal(permute_rows(x, index, backend="cuda"), permute_rows_reference(x, index))
    y = torch.randn(5000, 96, device=DEV)
    fan = torch.randint(0, 3, (5000,), device=DEV)  # ~1700 inputs per output row
    torch.testing.assert_close(combine_rows(y, fan, 3, backend="cuda"), combine_rows_reference(y, fan, 3),
                               atol=1e-3, rtol=1e-4)


def test_rows_cuda_gradients():
    index = rows_index(700, 129, seed=5).to(DEV)
    x0, y0 = torch.randn(129, 72, device=DEV), torch.randn(700, 72, device=DEV)
    w0 = torch.rand(700, device=DEV)
    up_p, up_c = torch.randn(700, 72, device=DEV), torch.randn(129, 72, device=DEV)
    got, want = [], []
    for backend, sink in (("cuda", got), ("reference", want)):
        x, y, w = (t.clone().requires_grad_() for t in (x0, y0, w0))
        ((permute_rows(x, index, backend=backend) * up_p).sum()
         + (combine_rows(y, index, 129, w, backend=backend) * up_c).sum()).backward()
        sink += [x.grad, y.grad, w.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    yd = torch.randn(30, 5, device=DEV, dtype=torch.float64, requires_grad=True)
    wd = torch.rand(30, device=DEV, dtype=torch.float64, requires_grad=True)
    small = rows_index(30, 7, seed=6).to(DEV)
    assert torch.autograd.gradcheck(lambda a, b: combine_rows(a, small, 7, b, backend="cuda"), (yd, wd))
    assert torch.autograd.gradcheck(lambda a: permute_rows(a, small, backend="cuda"), (yd[:7].detach()
                                                                                         .requires_grad_(),))


def assert_inverse_equivalent(inv, ref):
    """Same starts; each output row lists the same inputs (the CUDA fill order within a row is free)."""
    assert inv.starts_O1.dtype == inv.rows_N.dtype == torch.int32
    assert torch.equal(inv.starts_O1, ref.starts_O1)
    n = int(ref.starts_O1[-1])
    assert bool((inv.rows_N[n:] == -1).all())
    seg = torch.repeat_interleave(torch.arange(ref.starts_O1.numel() - 1, device=DEV),
                                  ref.starts_O1.diff().long(), output_size=n)
    big = inv.rows_N.numel() + 1
    assert torch.equal(torch.sort(seg * big + inv.rows_N[:n].long()).values, seg * big + ref.rows_N[:n].long())


@pytest.mark.parametrize("n,num_out,pad", [(0, 5, True), (0, 0, True), (1, 1, False), (1003, 301, True),
                                           (97, 3000, True), (5000, 3, False), (131072, 16384, False)])
def test_combine_index_cuda_equals_reference(n, num_out, pad):
    index = (rows_index(n, num_out, seed=n + num_out, pad=pad) if num_out else torch.full((n,), -1)).to(DEV)
    assert_inverse_equivalent(combine_index(index, num_out, backend="cuda"), combine_index_reference(index, num_out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 130, 2048])
def test_rows_cuda_with_inverse_equal_reference(dtype, D):
    index = rows_index(1003, 301, seed=D + 1).to(DEV)
    inv = combine_index(index, 301, backend="cuda")
    y = torch.randn(1003, D, device=DEV).to(dtype)
    w = torch.rand(1003, device=DEV)
    for weight in (None, w):
        out = combine_rows(y, index, 301, weight, backend="cuda", inverse=inv)
        assert torch.equal(out, combine_rows(y, index, 301, weight, backend="cuda"))  # same sum order as without
        tol = dict(atol=1e-5, rtol=1e-5) if dtype in (torch.float32, torch.float64) else {}
        torch.testing.assert_close(out, masked_combine_reference(y, index, 301, weight), **tol)
    zero = torch.zeros(0, dtype=torch.int64, device=DEV)  # zero input rows: zero output rows
    assert torch.equal(combine_rows(y[:0], zero, 5, backend="cuda", inverse=combine_index(zero, 5, backend="cuda")),
                       torch.zeros(5, D, device=DEV, dtype=dtype))


@pytest.mark.parametrize("D", [1, 7, 72, 130])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("need", ["both", "y", "w"])
def test_rows_cuda_one_pass_backward_with_inverse(D, dtype, need):
    index = rows_index(700, 129, seed=D).to(DEV)
    inv = combine_index(index, 129, backend="cuda")
    x0, y0 = torch.randn(129, D, device=DEV).to(dtype), torch.randn(700, D, device=DEV).to(dtype)
    w0 = torch.rand(700, device=DEV)
    up_p, up_c = torch.randn(700, D, device=DEV).to(dtype), torch.randn(129, D, device=DEV).to(dtype)
    got, want = [], []
    # the reference runs on the same values in float64: its own bf16 autograd would sum gradient rows in bf16
    for backend, sink, kw, cast in (("cuda", got, dict(inverse=inv), dtype), ("reference", want, {}, torch.float64)):
        x = x0.to(cast, copy=True).requires_grad_()
        y, w = y0.to(cast, copy=True).requires_grad_(need != "w"), w0.clone().requires_grad_(need != "y")
        ((permute_rows(x, index, backend=backend, **kw).double() * up_p.double()).sum()
         + (combine_rows(y, index, 129, w, backend=backend, **kw).double() * up_c.double()).sum()).backward()
        sink += [x.grad, y.grad, w.grad]
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.float(), b.float(), **tol)
    small = rows_index(30, 7, seed=D).to(DEV)
    inv_s = combine_index(small, 7, backend="cuda")
    yd = torch.randn(30, D, device=DEV, dtype=torch.float64, requires_grad=True)
    wd = torch.rand(30, device=DEV, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: combine_rows(a, small, 7, b, backend="cuda", inverse=inv_s), (yd, wd))
    xd = torch.randn(7, D, device=DEV, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: permute_rows(a, small, backend="cuda", inverse=inv_s), (xd,))


def test_auto_backend_uses_the_cuda_ops():
    try:
        from piper_ds.op_builder import loader
    except ImportError:
        from op_builder import loader
    assert loader.get_op("gating", "cuda", "auto") is not None
    assert loader.get_op("permute", "cuda", "auto") is not None
    assert loader.get_op("gating", "cuda", "auto").has_cuda()
