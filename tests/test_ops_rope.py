"""The rotary embedding op (piper_ds.ops.rotary) against its reference, on the CPU op and (marked ``gpu``) the CUDA
kernel: values, gradients, memory layouts, zero sizes, bad input; and the model's Attention on top of it."""
from __future__ import annotations

import pytest
import torch

from piper_ds.ops import rotary
from piper_ds.ops.reference import rope_reference
from piper_ds.testing import assert_same_function
from test_ops_build import cpu_ops
from test_ops_permute import DEVICES, backend_of


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_ops()


def tables(S_max, half, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, 2 * half, 2, dtype=torch.float32) / (2 * half)))
    ang = torch.outer(torch.arange(S_max, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def case(B, H, S, Dh, dtype, device, layout, seed=0):
    """x [B, H, S, Dh] as the attention makes it: 'bshd' is the transposed view of a [B, S, H, Dh] projection."""
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":
        x = torch.randn(B, S, H, Dh, generator=g).to(device, dtype).transpose(1, 2)
    else:
        x = torch.randn(B, H, S, Dh, generator=g).to(device, dtype)
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("B,H,S,Dh,S_max", [(2, 3, 5, 8, 9), (1, 16, 64, 128, 64), (3, 1, 7, 2, 7), (0, 2, 4, 8, 4),
                                            (2, 2, 0, 16, 3), (1, 2, 33, 6, 40)])
def test_rotary_equals_reference(device, dtype, layout, B, H, S, Dh, S_max):
    cos, sin = (t.to(device) for t in tables(S_max, Dh // 2))
    x = case(B, H, S, Dh, dtype, device, layout).requires_grad_(True)
    y = rotary(x, cos, sin, backend_of(device))
    ref = rope_reference(x.detach(), cos, sin)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()  # x's layout, no copy
    exact = device == "cpu"
    torch.testing.assert_close(y, ref, rtol=0 if exact else None, atol=0 if exact else None)
    # the incoming gradient in the output's layout, as the attention's backward hands it over
    g = torch.empty_like(y).copy_(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    (grad,) = torch.autograd.grad(y, x, g)
    xr = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(rope_reference(xr, cos, sin), xr, g)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want, **tol)
    assert grad.stride() == x.stride() or grad.numel() == 0


def test_rotary_is_a_rotation_its_inverse_undoes():
    cos, sin = tables(12, 4)
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    y = rope_reference(x, cos, sin)
    torch.testing.assert_close(rope_reference(y, cos, sin, inverse=True), x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # orthogonal per position
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated


def test_rotary_gradcheck_on_the_cpu_op():
    cos, sin = (t.double().float() for t in tables(6, 3))
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rotary(t, cos, sin, "cpu"), (x,))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rotary_errors_name_the_values(backend):
    cos, sin = tables(4, 4)
    with pytest.raises(TypeError, match="4-D floating"):
        rotary(torch.randn(4, 8), cos, sin, backend)
    with pytest.raises(ValueError, match="even head_dim"):
        rotary(torch.randn(1, 1, 4, 7), cos, sin, backend)
    with pytest.raises(ValueError, match=r"cos_SH must be float32 \[S_max >= 5, 4\], got torch.float32 \(4, 4\)"):
        rotary(torch.randn(1, 1, 5, 8), cos, sin, backend)
    with pytest.raises(ValueError, match="sin_SH must be float32"):
        rotary(torch.randn(1, 1, 4, 8), cos, sin.double(), backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        rotary(torch.randn(1, 1, 4, 8), cos, sin, "fast")


def test_compiled_op_checks_its_inputs_itself():
    op = cpu_ops()["rope"]
    cos, sin = tables(4, 4)
    with pytest.raises(ValueError, match="x must be 4-D"):
        op.rope(torch.randn(4, 8), cos, sin, False)
    with pytest.raises(ValueError, match="cos and sin must be contiguous"):
        op.rope(torch.randn(1, 1, 5, 8), cos, sin, False)
    with pytest.raises(TypeError, match="must be float32"):
        op.rope(torch.randn(1, 1, 4, 8), cos.double(), sin, False)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_with_the_op_equals_the_reference(device):
    from piper_ds.models.layers import Attention
    torch.manual_seed(0)
    ref = Attention(32, 4, 2, 8, 16, kernels="reference").to(device)
    fused = Attention(32, 4, 2, 8, 16, kernels=backend_of(device)).to(device)
    fused.load_state_dict(ref.state_dict())
    assert_same_function(fused, ref, torch.randn(2, 11, 32, device=device), atol=1e-5)
