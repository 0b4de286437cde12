"""The fused activation and the grouped expert MLP against the references (tier 2 on the CPU; the CUDA op and the
fused grouped-GEMM path on a GPU machine, marked ``gpu``)."""
from __future__ import annotations

import pytest
import torch

from piper_ds.ops import activation_backward, activation_forward, grouped_mlp
from piper_ds.ops.compiled import compiled_op
from piper_ds.ops.experts import (_FusedActivationDown, _GroupedLinear, dense_mlp,
                                 fanned_grouped_mlp, grouped_path)
from piper_ds.ops.permute import expand_rows, route_plan
from piper_ds.ops.reference import expand_rows_reference
from piper_ds.ops.reference import activation_reference
from test_ops_build import cpu_ops
from test_ops_permute import DEVICES, backend_of

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_ops()


def tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N,F", [(0, 8), (1, 1), (37, 13), (300, 1408), (64, 96)])
def test_activation_equals_reference(device, activation, dtype, N, F):
    W = 2 * F if activation == "swiglu" else F
    h = (torch.randn(N, W, dtype=dtype, device=device) * 3).requires_grad_(True)
    grad_a = torch.randn(N, F, dtype=dtype, device=device)
    ref = activation_reference(h, activation)
    (ref_grad, ) = torch.autograd.grad(ref, h, grad_a)
    be = backend_of(device)
    a = activation_forward(h.detach(), activation, be)
    torch.testing.assert_close(a, ref.detach(), **tol(dtype))
    for recompute in (False, True):
        grad_h, again = activation_backward(grad_a, h.detach(), activation, recompute, be)
        torch.testing.assert_close(grad_h, ref_grad, **tol(dtype))
        assert (again is None) != recompute
        if recompute:
            assert torch.equal(again, a)  # the recomputed activation is the forward's, bit for bit


def test_activation_errors_name_the_values():
    with pytest.raises(ValueError, match="activation must be one of"):
        activation_forward(torch.randn(2, 4), "relu")
    with pytest.raises(ValueError, match="even width"):
        activation_forward(torch.randn(2, 5), "swiglu")
    with pytest.raises(ValueError, match=r"grad_a_NF must have shape \(2, 2\)"):
        activation_backward(torch.randn(2, 3), torch.randn(2, 4), "swiglu")


def loop_reference(x, w_up, w_down, counts, activation):
    """fp32 per-expert loop: what every path must compute."""
    out, start = torch.zeros(x.shape[0], w_down.shape[-1]), 0
    for e, n in enumerate(counts.tolist()):
        rows = x[start:start + n].float().cpu()
        out[start:start + n] = activation_reference(rows @ w_up[e].float().cpu(), activation) @ w_down[e].float().cpu()
        start += n
    return out


def expert_case(L, D, F, counts, activation, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 2 * F if activation == "swiglu" else F
    counts = torch.tensor(counts, dtype=torch.int64)
    N = int(counts.sum())
    x = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_(True)
    w_up = (torch.randn(L, D, W, generator=g) * D ** -0.5).to(device, dtype).requires_grad_(True)
    w_down = (torch.randn(L, F, D, generator=g) * F ** -0.5).to(device, dtype).requires_grad_(True)
    return x, w_up, w_down, counts.to(device)


CASES = [  # L, D, F, rows per expert (zeros and odd sizes included)
    (4, 16, 24, [3, 0, 5, 1]),
    (3, 8, 8, [0, 0, 0]),
    (5, 12, 7, [2, 9, 0, 0, 4]),
    (8, 64, 96, [40, 0, 17, 33, 1, 0, 64, 5]),
]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("L,D,F,counts", CASES)
def test_grouped_mlp_loop_path_equals_reference(activation, L, D, F, counts):
    x, w_up, w_down, c = expert_case(L, D, F, counts, activation, torch.float64, "cpu")
    assert grouped_path(x, w_up, w_down, "auto") == "loop"
    y = grouped_mlp(x, w_up, w_down, c, activation=activation)
    torch.testing.assert_close(y.float(), loop_reference(x.detach(), w_up.detach(), w_down.detach(), c, activation))
    y.square().sum().backward()
    for name, t in (("x", x), ("w_up", w_up), ("w_down", w_down)):  # every rank's gradient hooks must fire
        assert t.grad is not None and t.grad.shape == t.shape, name
    if L * D * F > 5000:  # gradcheck perturbs every element: small cases only
        return
    assert torch.autograd.gradcheck(lambda a, b, d: grouped_mlp(a, b, d, c, activation=activation),
                                    (x.detach().requires_grad_(), w_up.detach().requires_grad_(),
                                     w_down.detach().requires_grad_()))


def test_grouped_mlp_ignores_rows_past_the_counts():
    """A bounded plan's tail rows take part in nothing and come out zero on the loop path."""
    x, w_up, w_down, c = expert_case(3, 8, 8, [2, 0, 3], "swiglu", torch.float32, "cpu")
    tail = torch.full((4, 8), float("nan"))
    y = grouped_mlp(torch.cat([x.detach(), tail]), w_up, w_down, c)
    torch.testing.assert_close(y[:5], grouped_mlp(x.detach(), w_up, w_down, c))
    assert not y[5:].any()


def test_grouped_mlp_errors_name_the_values():
    x, w_up, w_down, c = expert_case(2, 8, 8, [1, 1], "swiglu", torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"w_down \(2, 16, 8\)"):
        grouped_mlp(x, w_up, w_down.repeat(1, 2, 1), c)
    with pytest.raises(ValueError, match=r"counts_L must have shape \(2,\)"):
        grouped_mlp(x, w_up, w_down, c[:1])
    with pytest.raises(ValueError, match="activation must be one of"):
        grouped_mlp(x, w_up, w_down, c, activation="relu")


@pytest.mark.parametrize("backend", [pytest.param("auto", marks=GPU), pytest.param("reference", marks=GPU)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("L,D,F,counts", [(8, 64, 96, [40, 0, 17, 33, 1, 0, 64, 5]),
                                          (16, 256, 176, [0] * 8 + [300, 1, 0, 77, 5, 0, 0, 20]),
                                          (4, 128, 64, [0, 0, 0, 2])])
def test_grouped_mlp_cuda_paths_equal_reference(backend, activation, L, D, F, counts):
    x, w_up, w_down, c = expert_case(L, D, F, counts, activation, torch.bfloat16, "cuda", seed=L)
    assert grouped_path(x, w_up, w_down, backend) == ("fused" if backend == "auto" else "grouped")
    y = grouped_mlp(x, w_up, w_down, c, torch.cumsum(c, 0, dtype=torch.int32), activation, backend)
    ref = loop_reference(x.detach(), w_up.detach(), w_down.detach(), c, activation)
    assert ((y.float().cpu() - ref).norm() / ref.norm()).item() < 1e-2
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w_up, w_down), g)
    x32, u32, d32 = (t.detach().float().requires_grad_(True) for t in (x, w_up, w_down))
    want = torch.autograd.grad(grouped_mlp(x32.cpu(), u32.cpu(), d32.cpu(), c.cpu(), activation=activation),
                               (x32, u32, d32), g.float().cpu())
    for name, a, b in zip(("x", "w_up", "w_down"), grads, want):
        b = b.cpu()
        err = ((a.float().cpu() - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert err < 2e-2, (name, err)
        assert torch.isfinite(a).all(), name
    empty = c == 0  # experts without rows: exactly zero weight gradients
    assert not grads[1][empty].any() and not grads[2][empty].any()


def plain_ffn(x, w_up, w_down, activation):
    """A dense FFN as plain PyTorch writes it (separate gate and up projections)."""
    F_ = w_down.shape[1]
    if activation == "swiglu":
        a = torch.nn.functional.silu(x @ w_up[:F_].t()) * (x @ w_up[F_:].t())
    else:
        a = torch.nn.functional.gelu(x @ w_up.t())
    return a @ w_down.t()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,D,F", [((37,), 24, 13), ((2, 5, 3), 16, 8), ((0,), 8, 4), ((64,), 64, 96)])
def test_dense_mlp_fused_equals_plain_pytorch(device, activation, dtype, shape, D, F):
    """The fused path (the compiled activation op between two GEMMs, activation recomputed in backward) against
    plain PyTorch autograd on the same fp32 weights, including zero rows, odd sizes and leading batch dims."""
    g = torch.Generator().manual_seed(D + F)
    W = 2 * F if activation == "swiglu" else F
    x = torch.randn(*shape, D, generator=g).to(device, dtype).requires_grad_(True)
    w_up = (torch.randn(W, D, generator=g) / D ** 0.5).to(device, dtype).requires_grad_(True)
    w_down = (torch.randn(D, F, generator=g) / F ** 0.5).to(device, dtype).requires_grad_(True)
    y = dense_mlp(x, w_up, w_down, activation, backend_of(device))
    assert y.shape == x.shape and y.dtype == dtype
    x32, u32, d32 = (t.detach().double().cpu().requires_grad_(True) for t in (x, w_up, w_down))
    ref = plain_ffn(x32, u32, d32, activation)
    gy = torch.randn(y.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(y, (x, w_up, w_down), gy)
    want = torch.autograd.grad(ref, (x32, u32, d32), gy.double().cpu())
    if dtype == torch.float32:
        torch.testing.assert_close(y.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, want):
            torch.testing.assert_close(a.double().cpu(), b, rtol=1e-5, atol=1e-5)
        return
    for name, a, b in zip(("y", "x", "w_up", "w_down"), (y, *grads), (ref.detach(), *want)):  # bf16 rounding
        err = ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert err < 2e-2, (name, err)


def saved_shapes(fn):
    """The shapes of every tensor autograd saves while ``fn()`` runs, and fn's result."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return shapes, out


def test_dense_mlp_saves_only_its_input_and_the_up_projection():
    x = torch.randn(10, 16, requires_grad=True)
    w_up, w_down = torch.randn(24, 16, requires_grad=True), torch.randn(16, 12, requires_grad=True)
    shapes, y = saved_shapes(lambda: dense_mlp(x, w_up, w_down, "swiglu", "cpu"))
    assert type(y.grad_fn).__name__ != "MmBackward0"  # the fused Function ran (behind the view)
    assert _FusedActivationDown.__name__ + "Backward" in str(y.grad_fn.next_functions)
    assert (10, 24) in shapes  # h
    assert set(shapes) <= {(10, 16), (24, 16), (16, 24), (16, 12), (10, 24)}  # x, the weights, h: no activation


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,D,F,counts", [(4, 16, 24, [3, 0, 5, 1]), (3, 8, 8, [0, 0, 0]),
                                          (8, 64, 96, [40, 0, 17, 33, 1, 0, 64, 5])])
def test_grouped_fused_nodes_equal_the_loop_path_on_the_cpu(activation, dtype, L, D, F, counts):
    """The fused path's two autograd nodes (grouped up projection; fused activation + down projection) on the
    CPU's torch._grouped_mm: values and gradients of the loop path, and nothing saved but x, h and the weights."""
    x, w_up, w_down, c = expert_case(L, D, F, counts, activation, dtype, "cpu", seed=L + D)
    offsets = torch.cumsum(c, 0, dtype=torch.int32)
    shapes, y = saved_shapes(lambda: _FusedActivationDown.apply(_GroupedLinear.apply(x, w_up, offsets), w_down,
                                                                offsets, activation, "cpu"))
    N, W = x.shape[0], w_up.shape[2]
    assert set(shapes) <= {(N, D), (L, D, W), (L,), (N, W), (L, F, D)}, shapes  # no activation [N, F] kept
    ref = grouped_mlp(x, w_up, w_down, c, activation=activation)  # the loop path
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(y, (x, w_up, w_down), g) if N else None
    want = torch.autograd.grad(ref, (x, w_up, w_down), g) if N else None
    torch.testing.assert_close(y, ref, **tol(dtype))
    for name, a, b in zip(("x", "w_up", "w_down"), grads or (), want or ()):
        torch.testing.assert_close(a, b, **tol(dtype), msg=name)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,K,L,D,F,drop", [(9, 3, 4, 16, 24, 0.3), (5, 2, 3, 8, 8, 1.0), (40, 6, 8, 64, 96, 0.1)])
def test_fanned_node_keeps_the_rows_before_the_fan_on_the_cpu(activation, dtype, R, K, L, D, F, drop):
    """The fused path's fanned up projection (expansion inside the node) on the CPU's torch._grouped_mm and the
    CPU permute op: values and gradients of expand-then-loop, and the expanded [N, D] rows are not saved."""
    gen = torch.Generator().manual_seed(R + L)
    slots = torch.randint(0, L, (R, K), generator=gen)
    slots[torch.rand(R, K, generator=gen) < drop] = -1  # dropped pairs; drop 1.0: every expert gets zero rows
    plan = route_plan(slots, L, backend="cpu")
    N = plan.row_N.numel()
    x = torch.randn(R, D, generator=gen).to(dtype).requires_grad_(True)
    _, w_up, w_down, c = expert_case(L, D, F, plan.counts_L.tolist(), activation, dtype, "cpu", seed=R)
    row_op = compiled_op("permute", x.device, "cpu")
    assert row_op is not None
    shapes, y = saved_shapes(lambda: _FusedActivationDown.apply(
        _GroupedLinear.apply(x, w_up, plan.offsets_L, plan.pos_RK, N, row_op), w_down, plan.offsets_L,
        activation, "cpu"))
    W = w_up.shape[2]
    if N not in (0, R) and W != D:  # else [N, D] is also another saved tensor's shape
        assert (N, D) not in shapes, shapes
    assert set(shapes) <= {(R, D), (R, K), (L, D, W), (L,), (N, W), (L, F, D)}, shapes
    ref = grouped_mlp(expand_rows_reference(x, plan.pos_RK, N), w_up, w_down, c, activation=activation)
    fallback = fanned_grouped_mlp(x, plan.pos_RK, N, w_up, w_down, c, activation=activation, backend="cpu")
    torch.testing.assert_close(y, ref, **tol(dtype))
    torch.testing.assert_close(fallback, ref, **tol(dtype))
    if N:
        g = torch.randn(ref.shape, generator=gen).to(dtype)
        want = torch.autograd.grad(ref, (x, w_up, w_down), g)
        for got in (torch.autograd.grad(y, (x, w_up, w_down), g), torch.autograd.grad(fallback, (x, w_up, w_down), g)):
            for name, a, b in zip(("x", "w_up", "w_down"), got, want):
                torch.testing.assert_close(a, b, **tol(dtype), msg=name)


def test_fanned_grouped_mlp_errors_name_the_values():
    x, pos = torch.randn(3, 8), torch.tensor([[0, 1], [2, -1], [3, 4]])
    w_up, w_down, c = torch.randn(2, 8, 16), torch.randn(2, 8, 8), torch.tensor([2, 3])
    with pytest.raises(ValueError, match="num_rows"):
        fanned_grouped_mlp(x, pos, -1, w_up, w_down, c, backend="cpu")
    with pytest.raises(ValueError, match="shapes do not fit"):
        fanned_grouped_mlp(x, pos, 5, w_up, w_down[:, :4], c, backend="cpu")
    assert fanned_grouped_mlp(x, pos, 5, w_up, w_down, c, backend="cpu").shape == (5, 8)


def test_dense_mlp_errors_name_the_values():
    with pytest.raises(ValueError, match="activation must be one of"):
        dense_mlp(torch.randn(2, 4), torch.randn(8, 4), torch.randn(4, 4), "relu")
    with pytest.raises(ValueError, match=r"w_down \(4, 3\)"):
        dense_mlp(torch.randn(2, 4), torch.randn(8, 4), torch.randn(4, 3), "swiglu")
    with pytest.raises(ValueError, match="shapes do not fit"):
        dense_mlp(torch.randn(2, 4), torch.randn(7, 4), torch.randn(4, 3), "swiglu")
    with pytest.raises(TypeError, match="share a dtype"):
        dense_mlp(torch.randn(2, 4), torch.randn(8, 4).double(), torch.randn(4, 4), "swiglu")
