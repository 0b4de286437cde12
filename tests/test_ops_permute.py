"""Dispatch plans and fan-index row movement against the references, with autograd (tier 2 on the CPU's C++ op;
the same tests run the CUDA op on a GPU machine, marked ``gpu``)."""
from __future__ import annotations

import pytest
import torch

from piper_ds.ops import expand_rows, reduce_rows, route_plan, send_plan
from piper_ds.ops.reference import (expand_rows_reference, reduce_rows_reference, route_plan_reference,
                                    send_plan_reference)
from test_ops_build import cpu_ops

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])
DEVICES = ["cpu", CUDA]


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_ops()


def backend_of(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


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


def fan_index(R, K, N, fill=0.7, seed=0, device="cpu"):
    """pos [R, K]: a random injective map of ~fill of the (r, k) pairs onto rows [0, N), -1 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    take = torch.rand(R * K, generator=g) < fill
    rows = torch.randperm(N, generator=g)[:int(take.sum())] if N else torch.zeros(0, dtype=torch.int64)
    take[take.nonzero(as_tuple=True)[0][rows.numel():]] = False  # more pairs than rows: the rest stay -1
    pos = torch.full((R * K, ), -1, dtype=torch.int64)
    pos[take] = rows
    return pos.view(R, K).to(device)


def assert_plans_equal(a, b):
    for name, x, y in zip(a._fields, a, b):
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), (name, x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,K,R", [(0, 8, 2, 2), (1, 8, 1, 1), (50, 64, 6, 4), (257, 256, 8, 8), (33, 9, 3, 3),
                                     (100, 64, 8, 1), (64, 16, 4, 16)])
def test_send_plan_equals_reference(device, T, E, K, R):
    idx, w = routing(T, E, K, seed=T + E, device=device)
    rank, slot = placement(E, R, seed=K, device=device)
    out = send_plan(idx, w, rank, slot, R, backend=backend_of(device))
    assert_plans_equal(out, send_plan_reference(idx, w, rank, slot, R))
    known = send_plan(idx, w, rank, slot, R, backend=backend_of(device), num_rows=int(out.send_counts_R.sum()))
    assert_plans_equal(known, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", range(1, 9))
def test_send_then_route_every_k(device, K):
    T, E, R = 77, 48, 4
    idx, w = routing(T, E, K, seed=K, device=device)
    rank, slot = placement(E, R, seed=K, device=device)
    plan = send_plan(idx, w, rank, slot, R, backend=backend_of(device))
    L = E // R
    got = route_plan(plan.slots_SK, L, backend=backend_of(device))
    assert_plans_equal(got, route_plan_reference(plan.slots_SK, L))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,K,drop", [(0, 4, 2, 0.0), (1, 1, 1, 0.0), (130, 32, 8, 0.0), (500, 16, 6, 0.2),
                                        (7, 256, 3, 0.5), (3000, 64, 6, 0.0), (9000, 128, 8, 0.05),
                                        (40, 2000, 4, 0.0)])
def test_route_plan_through_a_slot_map(device, T, E, K, drop):
    """ep = 1: the router's top-k straight in, through a shuffled slot map; exact, bounded and counted plans."""
    idx, _ = routing(T, E, K, drop=drop, seed=T, device=device)
    slot_map = torch.randperm(E, generator=torch.Generator().manual_seed(E)).to(device)
    ref = route_plan_reference(idx, E, slot_map)
    be = backend_of(device)
    assert_plans_equal(route_plan(idx, E, slot_map, be), ref)
    assert_plans_equal(route_plan(idx, E, slot_map, be, num_rows=ref.row_N.numel()), ref)
    bounded = route_plan(idx, E, slot_map, be, bounded=True)
    assert_plans_equal(bounded, route_plan_reference(idx, E, slot_map, bounded=True))
    assert bounded.row_N.numel() == T * K and int(bounded.offsets_L[-1]) == ref.row_N.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_route_plan_with_experts_held_elsewhere(device):
    """A slot map with -1 entries (experts of other ranks): those pairs get no row and pos -1."""
    idx, _ = routing(200, 16, 4, drop=0.0, seed=3, device=device)
    slot_map = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1] * 2, device=device)
    slot_map[8:] = torch.where(slot_map[8:] >= 0, slot_map[8:] + 4, -1)
    plan = route_plan(idx, 8, slot_map, backend_of(device))
    assert_plans_equal(plan, route_plan_reference(idx, 8, slot_map))
    assert bool(((plan.pos_RK >= 0) == (slot_map[idx] >= 0)).all())


def test_route_plan_errors_name_the_values():
    with pytest.raises(TypeError, match="int64"):
        route_plan(torch.zeros(3, 2, dtype=torch.int32), 4, backend="cpu")
    with pytest.raises(ValueError, match="num_local must be >= 1"):
        route_plan(torch.zeros(3, 2, dtype=torch.int64), 0, backend="cpu")
    with pytest.raises(ValueError, match=r"slot 5 >= num_local \(4\)"):
        route_plan(torch.tensor([[5, 0]]), 4, backend="cpu")
    with pytest.raises(ValueError, match=r"slot 5 >= num_local \(4\)"):
        route_plan(torch.tensor([[5, 0]]), 4, backend="reference")
    with pytest.raises(ValueError, match="num_rows is 3 but the plan has 2 rows"):
        route_plan(torch.tensor([[1, 0]]), 4, backend="cpu", num_rows=3)
    with pytest.raises(ValueError, match="exclude each other"):
        route_plan(torch.tensor([[1, 0]]), 4, backend="cpu", num_rows=2, bounded=True)
    with pytest.raises(ValueError, match="slot_map has only 2 entries"):
        route_plan(torch.tensor([[3, 0]]), 4, torch.tensor([0, 1]), backend="cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 8, 96, 2048])
@pytest.mark.parametrize("weighted", [False, True])
def test_rows_equal_reference(device, dtype, D, weighted):
    R, K, N = 53, 6, 300
    pos = fan_index(R, K, N, seed=D, device=device)
    x = torch.randn(R, D, dtype=dtype, device=device)
    be = backend_of(device)
    covered = torch.zeros(N, dtype=torch.bool, device=device)
    covered[pos[pos >= 0]] = True
    got = expand_rows(x, pos, N, backend=be)
    assert torch.equal(got[covered], expand_rows_reference(x, pos, N)[covered])
    y = torch.randn(N, D, dtype=dtype, device=device)
    w = torch.rand(R, K, device=device) if weighted else None
    torch.testing.assert_close(reduce_rows(y, pos, w, backend=be), reduce_rows_reference(y, pos, w),
                               **({} if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 3, 32])
def test_row_gradients_equal_reference_autograd(device, K):
    R, D, N = 40, 24, 1000
    pos = fan_index(R, K, N, fill=0.8, seed=K, device=device)
    be = backend_of(device)
    x = torch.randn(R, D, device=device, requires_grad=True)
    y = torch.randn(N, D, device=device, requires_grad=True)
    w = torch.rand(R, K, device=device, requires_grad=True)
    g_out = torch.randn(R, D, device=device)
    covered = torch.zeros(N, dtype=torch.bool, device=device)
    covered[pos[pos >= 0]] = True
    g_exp = torch.randn(N, D, device=device) * covered[:, None]
    grads = []
    for fn_e, fn_r in ((lambda *a: expand_rows(*a, backend=be), lambda *a: reduce_rows(*a, backend=be)),
                       (expand_rows_reference, reduce_rows_reference)):
        loss = (fn_e(x, pos, N) * g_exp).sum() + (fn_r(y, pos, w) * g_out).sum()
        grads.append(torch.autograd.grad(loss, (x, y, w)))
    for name, a, b in zip(("x", "y", "w"), *grads):  # rows of y no pair points at: zero gradient
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_gradcheck_rows_float64():
    pos = fan_index(9, 3, 30, seed=1)
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: expand_rows(t, pos, 30, backend="cpu"), (x, ))
    assert torch.autograd.gradcheck(lambda a, b: reduce_rows(a, pos, b, backend="cpu"), (y, w))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_zero_size_stay_on_the_graph(device):
    """No wide rows, no expanded rows: empty outputs, and the inputs still get (empty) gradients, so a rank that
    receives nothing still runs its backward exchanges."""
    be = backend_of(device)
    pos = torch.full((4, 2), -1, dtype=torch.int64, device=device)
    y = torch.randn(0, 8, device=device, requires_grad=True)
    w = torch.rand(4, 2, device=device, requires_grad=True)
    out = reduce_rows(y, pos, w, backend=be)
    assert out.shape == (4, 8) and not out.any()
    out.sum().backward()
    assert y.grad.shape == (0, 8) and not w.grad.any()
    x = torch.randn(0, 8, device=device, requires_grad=True)
    h = expand_rows(x, torch.zeros(0, 3, dtype=torch.int64, device=device), 0, backend=be)
    assert h.shape == (0, 8)
    h.sum().backward()
    assert x.grad.shape == (0, 8)


def test_row_errors_name_the_values():
    x, pos = torch.randn(3, 4), torch.tensor([[0, 1], [2, -1], [-1, -1]])
    with pytest.raises(TypeError, match="int64"):
        expand_rows(x, pos.int(), 3, backend="cpu")
    with pytest.raises(ValueError, match=r"pos_RK has 3 rows but x_RD has 2"):
        expand_rows(x[:2], pos, 3, backend="cpu")
    with pytest.raises(ValueError, match="fan <= 32"):
        expand_rows(x, torch.zeros(3, 33, dtype=torch.int64), 3, backend="cpu")
    with pytest.raises(IndexError, match=r"pos values must lie in \[-1, 2\), got 2"):
        expand_rows(x, pos, 2, backend="cpu")
    with pytest.raises(ValueError, match="row 1 appears twice"):
        reduce_rows(torch.randn(3, 4), torch.tensor([[0, 1], [1, -1]]), backend="cpu")
    with pytest.raises(ValueError, match=r"weight_RK must have pos_RK's shape \(3, 2\)"):
        reduce_rows(torch.randn(3, 4), pos, torch.rand(3), backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        reduce_rows(torch.randn(3, 4), pos, backend="fast")


def test_send_plan_weights_are_differentiable():
    idx, w = routing(20, 8, 2, seed=4)
    w.requires_grad_(True)
    rank, slot = placement(8, 2)
    plan = send_plan(idx, w, rank, slot, 2, backend="cpu")
    plan.weights_SK.sum().backward()
    assert torch.equal(w.grad, (idx >= 0).float())


@pytest.mark.parametrize("device", DEVICES)
def test_reduce_over_an_exact_plan_skips_nothing(device):
    """all_covered (an exact plan: every expanded row is some pair's) gives the same gradients as the default."""
    idx, w = routing(300, 16, 4, drop=0.0, seed=9, device=device)
    plan = route_plan(idx, 16, torch.arange(16, device=device), backend_of(device), num_rows=1200)
    y = torch.randn(1200, 40, device=device, requires_grad=True)
    grads = []
    for covered in (False, True):
        out = reduce_rows(y, plan.pos_RK, w.requires_grad_(True), backend=backend_of(device), all_covered=covered)
        grads.append(torch.autograd.grad(out.square().sum(), (y, w)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
