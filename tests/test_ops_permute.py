"""Dispatch plans and row movement: the C++ CPU op against the references, and autograd (tier 2, CPU)."""
from __future__ import annotations

import pytest
import torch

from piper_ds.ops import RowInverse, combine_index, combine_rows, expand_plan, permute_rows, send_plan
from piper_ds.ops.permute import _pad_groups
from piper_ds.ops.reference import (combine_index_reference, combine_rows_reference, expand_plan_reference,
                                    permute_rows_reference, send_plan_reference)
from test_ops_build import cpu_ops


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_ops()


def routing(T, E, K, drop=0.1, seed=0, device="cpu"):
    """Distinct top-k experts per token, ~drop of the assignments dropped (-1), and their weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices if T else torch.zeros(0, K, dtype=torch.int64)
    idx = torch.where(torch.rand(T, K, generator=g) < drop, torch.full_like(idx, -1), idx)
    return idx.to(device), torch.rand(T, K, generator=g).to(device)


def placement(E, R, seed=0, device="cpu"):
    """Experts spread over R ranks in a shuffled (non-contiguous) way; slot = order among the rank's experts."""
    rank = torch.randperm(E, generator=torch.Generator().manual_seed(seed)) % R
    onehot = torch.nn.functional.one_hot(rank, R)
    slot = (onehot.cumsum(0) - 1).gather(1, rank[:, None]).squeeze(1)
    return rank.to(device), slot.to(device)


def assert_plans_equal(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), (x, y)


@pytest.mark.parametrize("T,E,K,R", [(0, 8, 2, 2), (1, 8, 1, 1), (50, 64, 6, 4), (257, 256, 8, 8), (33, 9, 3, 3),
                                     (100, 64, 8, 1), (64, 16, 4, 16)])
def test_send_plan_equals_reference(T, E, K, R):
    idx, w = routing(T, E, K, seed=T + E)
    rank, slot = placement(E, R, seed=K)
    out = send_plan(idx, w, rank, slot, R, backend="cpu")
    assert_plans_equal(out, send_plan_reference(idx, w, rank, slot, R))


@pytest.mark.parametrize("K", range(1, 9))
def test_send_then_expand_every_k(K):
    T, E, R = 77, 48, 4
    idx, w = routing(T, E, K, seed=K)
    rank, slot = placement(E, R, seed=K)
    plan = send_plan(idx, w, rank, slot, R, backend="cpu")
    L = E // R
    exp = expand_plan(plan.slots_SK, plan.weights_SK, L, backend="cpu")
    assert_plans_equal(exp, expand_plan_reference(plan.slots_SK, plan.weights_SK, L))


@pytest.mark.parametrize("rows,K,L", [(0, 4, 3), (1, 1, 1), (130, 8, 32), (500, 6, 16), (7, 3, 256)])
@pytest.mark.parametrize("align", [1, 4, 128])
def test_expand_plan_equals_reference(rows, K, L, align):
    g = torch.Generator().manual_seed(rows * 7 + L)
    slots = torch.randint(-1, L, (rows, K), generator=g)
    weights = torch.rand(rows, K, generator=g)
    out = expand_plan(slots, weights, L, align=align, backend="cpu")
    ref = expand_plan_reference(slots, weights, L)
    ref = _pad_groups(ref, align) if align > 1 else ref
    assert_plans_equal(out, ref)
    assert (out.tokens_per_slot_L % align == 0).all() and out.row_idx_N.numel() == out.tokens_per_slot_L.sum()
    assert torch.equal(out.row_idx_N >= 0, out.pair_N >= 0)
    assert torch.equal(expand_plan(slots, weights, L, align=align, backend="reference").row_idx_N, out.row_idx_N)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_plans_with_known_row_counts(backend):
    """num_rows (the caller's count, from the exchanged counts) gives the same plans; a wrong one is an error."""
    T, E, K, R = 61, 32, 4, 4
    idx, w = routing(T, E, K, seed=3)
    rank, slot = placement(E, R, seed=3)
    plan = send_plan(idx, w, rank, slot, R, backend=backend)
    S = plan.token_idx_S.numel()
    assert_plans_equal(send_plan(idx, w, rank, slot, R, backend=backend, num_rows=S), plan)
    exp = expand_plan(plan.slots_SK, plan.weights_SK, E // R, backend=backend)
    N = exp.row_idx_N.numel()
    assert_plans_equal(expand_plan(plan.slots_SK, plan.weights_SK, E // R, backend=backend, num_rows=N), exp)
    with pytest.raises(ValueError, match=f"num_rows is {S + 1} but the plan has {S} rows"):
        send_plan(idx, w, rank, slot, R, backend=backend, num_rows=S + 1)
    with pytest.raises(ValueError, match=f"num_rows is {N - 1} but the plan has {N} rows"):
        expand_plan(plan.slots_SK, plan.weights_SK, E // R, backend=backend, num_rows=N - 1)
    with pytest.raises(ValueError, match="align 1"):
        expand_plan(plan.slots_SK, plan.weights_SK, E // R, align=4, backend=backend, num_rows=N)
    with pytest.raises(ValueError, match="num_rows must be"):
        send_plan(idx, w, rank, slot, R, backend=backend, num_rows=-2)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_combine_into_no_rows_keeps_the_graph(backend):
    """A rank that receives no rows still sends gradients back: its combine must stay on the autograd graph."""
    y = torch.randn(3, 4, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    out = combine_rows(y, torch.full((3,), -1, dtype=torch.int64), 0, w, backend=backend)
    assert out.shape == (0, 4) and out.grad_fn is not None
    out.sum().backward()
    assert torch.equal(y.grad, torch.zeros(3, 4)) and torch.equal(w.grad, torch.zeros(3))


def test_expand_plan_of_1d_slots():
    slots = torch.tensor([2, -1, 0, 2, 1, 0])
    w = torch.rand(6)
    assert_plans_equal(expand_plan(slots, w, 3, backend="cpu"), expand_plan_reference(slots, w, 3))


def test_plan_errors_name_the_values():
    idx, w = routing(10, 8, 2, drop=0.0)
    rank, slot = placement(8, 2)
    with pytest.raises(ValueError, match="expert_rank_E"):
        send_plan(idx, w, rank[:4], slot[:4], 2, backend="cpu")
    with pytest.raises(ValueError, match=r"outside \[0, ep_size"):
        send_plan(idx, w, rank + 5, slot, 2, backend="cpu")
    with pytest.raises(ValueError, match="num_local"):
        expand_plan(torch.tensor([[0, 5]]), torch.rand(1, 2), 3, backend="cpu")
    with pytest.raises(ValueError, match="num_local"):
        expand_plan(torch.tensor([[0, 5]]), torch.rand(1, 2), 3, backend="reference")
    with pytest.raises(ValueError, match="align"):
        expand_plan(torch.tensor([[0, 1]]), torch.rand(1, 2), 3, align=0, backend="cpu")


def rows_index(n, num_rows, seed, pad=True):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, max(num_rows, 1), (n,), generator=g)
    if pad:
        index[torch.rand(n, generator=g) < 0.15] = -1
    return index


def masked_permute_reference(x, index):
    return permute_rows_reference(x, index.clamp_min(0)) * (index >= 0)[:, None].to(x.dtype)


def masked_combine_reference(y, index, num_out, weight=None):
    keep = index >= 0
    w = None if weight is None else weight[keep]
    return combine_rows_reference(y[keep], index[keep], num_out, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 64, 130])
def test_permute_rows_equals_reference(dtype, D):
    x = torch.randn(37, D).to(dtype)
    index = rows_index(101, 37, seed=D)
    assert torch.equal(permute_rows(x, index, backend="cpu"), masked_permute_reference(x, index))
    full = index.clamp_min(0)
    assert torch.equal(permute_rows(x, full, backend="cpu"), permute_rows_reference(x, full))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D,weighted", [(1, True), (7, False), (64, True), (130, True)])
def test_combine_rows_equals_reference(dtype, D, weighted):
    y = torch.randn(203, D).to(dtype)
    index = rows_index(203, 41, seed=D)
    w = torch.rand(203) if weighted else None
    out = combine_rows(y, index, 41, w, backend="cpu")
    torch.testing.assert_close(out, masked_combine_reference(y, index, 41, w), atol=1e-6, rtol=1e-6)
    assert out.dtype == dtype and out.shape == (41, D)


def test_rows_of_zero_size():
    x = torch.randn(0, 16)
    assert permute_rows(x, torch.zeros(0, dtype=torch.int64), backend="cpu").shape == (0, 16)
    assert torch.equal(combine_rows(x, torch.zeros(0, dtype=torch.int64), 5, backend="cpu"), torch.zeros(5, 16))
    assert combine_rows(torch.randn(3, 4), torch.full((3,), -1), 0, backend="cpu").shape == (0, 4)


def test_gradcheck_permute_and_combine_float64():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    index = rows_index(20, 9, seed=1)
    assert torch.autograd.gradcheck(lambda t: permute_rows(t, index, backend="cpu"), (x,))
    y = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: combine_rows(a, index, 9, b, backend="cpu"), (y, w))
    assert torch.autograd.gradcheck(lambda a: combine_rows(a, index, 9, backend="cpu"), (y,))


def test_row_grads_match_reference_autograd():
    index = rows_index(60, 13, seed=2, pad=False)
    g = torch.Generator().manual_seed(9)
    x0, y0, w0 = torch.randn(13, 24, generator=g), torch.randn(60, 24, generator=g), torch.rand(60, generator=g)
    up_p, up_c = torch.randn(60, 24, generator=g), torch.randn(13, 24, generator=g)
    got, want = [], []
    for backend, sink in (("cpu", got), ("reference", want)):
        x, y, w = (t.clone().requires_grad_() for t in (x0, y0, w0))
        ((permute_rows(x, index, backend=backend) * up_p).sum()
         + (combine_rows(y, index, 13, w, backend=backend) * up_c).sum()).backward()
        sink += [x.grad, y.grad, w.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,num_out,pad", [(0, 5, True), (0, 0, True), (1, 1, False), (203, 41, True),
                                           (97, 300, True), (64, 3, False)])
def test_combine_index_equals_reference(n, num_out, pad):
    index = rows_index(n, num_out, seed=n + num_out, pad=pad) if num_out else torch.full((n,), -1)
    inv, ref = combine_index(index, num_out, backend="cpu"), combine_index_reference(index, num_out)
    assert isinstance(inv, RowInverse) and inv.starts_O1.dtype == inv.rows_N.dtype == torch.int32
    assert torch.equal(inv.starts_O1, ref.starts_O1) and torch.equal(inv.rows_N, ref.rows_N)
    assert torch.equal(combine_index(index, num_out, backend="reference").rows_N, ref.rows_N)
    valid = index >= 0  # the reference: each output row lists exactly its inputs, ascending, -1 for the rest
    assert int(ref.starts_O1[-1]) == int(valid.sum()) and bool((ref.rows_N[int(valid.sum()):] == -1).all())
    rows = ref.rows_N[:int(valid.sum())].long()
    assert torch.equal(index[rows], torch.repeat_interleave(torch.arange(num_out), ref.starts_O1.diff().long()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 130])
def test_combine_with_inverse_equals_without(dtype, D):
    y = torch.randn(203, D).to(dtype)
    index = rows_index(203, 41, seed=D)
    inv = combine_index(index, 41, backend="cpu")
    for w in (None, torch.rand(203)):
        out = combine_rows(y, index, 41, w, backend="cpu", inverse=inv)
        assert torch.equal(out, combine_rows(y, index, 41, w, backend="cpu"))
        torch.testing.assert_close(out, masked_combine_reference(y, index, 41, w), atol=1e-6, rtol=1e-6)
    assert torch.equal(combine_rows(y, index, 41, backend="reference", inverse=inv),
                       masked_combine_reference(y, index, 41))


@pytest.mark.parametrize("need", ["both", "y", "w"])
def test_inverse_in_autograd_and_one_pass_backward(need):
    index = rows_index(60, 13, seed=4)
    inv = combine_index(index, 13, backend="cpu")
    g = torch.Generator().manual_seed(3)
    x0, y0, w0 = torch.randn(13, 24, generator=g), torch.randn(60, 24, generator=g), torch.rand(60, generator=g)
    up_p, up_c = torch.randn(60, 24, generator=g), torch.randn(13, 24, generator=g)
    got, want = [], []
    for backend, sink, kw in (("cpu", got, dict(inverse=inv)), ("reference", want, {})):
        x = x0.clone().requires_grad_()
        y, w = y0.clone().requires_grad_(need != "w"), w0.clone().requires_grad_(need != "y")
        ((permute_rows(x, index, backend=backend, **kw) * up_p).sum()
         + (combine_rows(y, index, 13, w, backend=backend, **kw) * up_c).sum()).backward()
        sink += [x.grad, y.grad, w.grad]
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    yd = torch.randn(60, 5, dtype=torch.float64, requires_grad=True)
    wd = torch.rand(60, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: combine_rows(a, index, 13, b, backend="cpu", inverse=inv), (yd, wd))
    xd = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: permute_rows(a, index, backend="cpu", inverse=inv), (xd,))


def test_inverse_errors():
    index = rows_index(20, 9, seed=1)
    inv = combine_index(index, 9, backend="cpu")
    y = torch.randn(20, 4)
    with pytest.raises(ValueError, match="combine_index"):
        combine_rows(y, index, 8, backend="cpu", inverse=inv)  # built for 9 output rows
    with pytest.raises(TypeError, match="RowInverse"):
        combine_rows(y, index, 9, backend="cpu", inverse=tuple(inv))
    with pytest.raises(IndexError):
        combine_index(torch.tensor([0, 9]), 9, backend="cpu")
    with pytest.raises(IndexError):
        combine_index(torch.tensor([0, 9]), 9, backend="reference")


def test_send_plan_weights_are_differentiable():
    idx, w = routing(20, 16, 4)
    w.requires_grad_()
    rank, slot = placement(16, 4)
    send_plan(idx, w, rank, slot, 4, backend="cpu").weights_SK.sum().backward()
    assert torch.equal(w.grad, (idx >= 0).float())  # each kept assignment is sent exactly once


def test_row_errors():
    x = torch.randn(4, 3)
    with pytest.raises(IndexError, match=r"\[-1, 4\)"):
        permute_rows(x, torch.tensor([0, 4]), backend="cpu")
    with pytest.raises(IndexError):
        combine_rows(x, torch.tensor([0, 1, 2, 7]), 3, backend="cpu")
    with pytest.raises(TypeError, match="int64"):
        permute_rows(x, torch.tensor([0, 1], dtype=torch.int32), backend="cpu")
    with pytest.raises(TypeError, match="floating"):
        permute_rows(x.long(), torch.tensor([0, 1]), backend="cpu")
    with pytest.raises(ValueError, match="weight"):
        combine_rows(x, torch.tensor([0, 1, 2, 0]), 3, torch.rand(3), backend="cpu")
