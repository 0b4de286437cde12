"""The master-weight Adam(W) op (piper_ds.ops.adamw) against its reference, and the reference against torch's
Adam / AdamW (tier 2, CPU; the CUDA kernel's cases are in test_ops_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from piper_ds.ops.adamw import adamw_step
from piper_ds.ops.reference import adamw_reference
from test_ops_build import cpu_ops


@pytest.fixture(scope="module")
def _built():
    cpu_ops()


HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


@pytest.mark.parametrize("optimizer,weight_decay", [(torch.optim.AdamW, 0.1), (torch.optim.Adam, 0.05),
                                                    (torch.optim.Adam, 0.0)])
def test_reference_equals_torch_adam_bit_for_bit(optimizer, weight_decay):
    gen = torch.Generator().manual_seed(0)
    sizes = (7, 33, 0, 1000)
    start = [torch.randn(n, generator=gen) for n in sizes]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    torch_opt = optimizer(params, lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"], weight_decay=weight_decay)
    master = torch.cat(start)
    exp_avg, exp_avg_sq = torch.zeros_like(master), torch.zeros_like(master)
    step = torch.tensor(0.0)
    for _ in range(5):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        torch_opt.step()
        step += 1
        adamw_step(grads, master, exp_avg, exp_avg_sq, None, step=step, weight_decay=weight_decay,
                   decoupled=optimizer is torch.optim.AdamW, backend="reference", **HYPER)
    assert torch.equal(master, torch.cat([p.detach() for p in params]))
    assert torch.equal(exp_avg, torch.cat([torch_opt.state[p]["exp_avg"] for p in params]))
    assert torch.equal(exp_avg_sq, torch.cat([torch_opt.state[p]["exp_avg_sq"] for p in params]))


def test_reference_multiplier_is_a_scaled_gradient():
    gen = torch.Generator().manual_seed(1)
    grad, master = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    mult = torch.tensor(0.25)
    outs = []
    for g, m in ((grad, mult), (grad * mult, None)):
        p, a, b = master.clone(), torch.zeros(64), torch.zeros(64)
        adamw_reference(g, p, a, b, None, 1.0, 1e-2, 0.9, 0.999, 1e-8, 0.1, True, m)
        outs.append((p, a, b))
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def _run(backend, grad_dtype, decoupled, multiplier, lowp_dtype, sizes, steps=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = sum(sizes) + 3  # a tail no gradient covers stays as it is
    master = torch.randn(P, generator=gen)
    tail = master[-3:].clone()
    exp_avg, exp_avg_sq = torch.zeros(P), torch.zeros(P)
    lowp = None if lowp_dtype is None else torch.zeros(P, dtype=lowp_dtype)
    step = torch.tensor(0.0)
    for _ in range(steps):
        grads = [torch.randn(n, generator=gen).to(grad_dtype) for n in sizes]
        step += 1
        mult = torch.tensor(0.37) if multiplier else None
        adamw_step(grads, master, exp_avg, exp_avg_sq, lowp, step=step, lr=1e-2, betas=(0.9, 0.999), eps=1e-6,
                   weight_decay=0.1, decoupled=decoupled, grad_multiplier=mult, backend=backend)
    assert torch.equal(master[-3:], tail)
    return master, exp_avg, exp_avg_sq, lowp


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("multiplier,lowp_dtype", [(True, torch.bfloat16), (False, None), (True, torch.float32)])
def test_cpu_op_equals_reference(_built, grad_dtype, decoupled, multiplier, lowp_dtype):
    sizes = (5, 0, 129, 64, 1)
    ref = _run("reference", grad_dtype, decoupled, multiplier, lowp_dtype, sizes)
    out = _run("cpu", grad_dtype, decoupled, multiplier, lowp_dtype, sizes)
    for name, x, y in zip(("master", "exp_avg", "exp_avg_sq", "lowp"), out, ref):
        if y is None:
            assert x is None
        else:
            assert torch.equal(x, y), name
    if lowp_dtype is not None:  # the covered ranges are the master rounded; the uncovered tail stays untouched
        assert torch.equal(out[3][:-3], out[0][:-3].to(lowp_dtype)) and not out[3][-3:].any()


def test_no_gradients_change_nothing(_built):
    for backend in ("reference", "cpu"):
        master, exp_avg = torch.randn(8), torch.zeros(8)
        before = master.clone()
        adamw_step([], master, exp_avg, torch.zeros(8), None, step=torch.tensor(1.0), lr=1.0, betas=(0.9, 0.9),
                   eps=1e-8, weight_decay=0.5, backend=backend)
        assert torch.equal(master, before) and not exp_avg.any()


def _args(**over):
    kw = dict(grads=[torch.randn(4)], master=torch.zeros(8), exp_avg=torch.zeros(8), exp_avg_sq=torch.zeros(8),
              lowp=None, step=torch.tensor(1.0), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    kw.update(over)
    grads, master, exp_avg, exp_avg_sq, lowp = (kw.pop(k) for k in ("grads", "master", "exp_avg", "exp_avg_sq",
                                                                   "lowp"))
    return (grads, master, exp_avg, exp_avg_sq, lowp), kw


@pytest.mark.parametrize("over,error,match", [
    ({"master": torch.zeros(8, dtype=torch.float64)}, TypeError, "master must be a 1-D contiguous fp32"),
    ({"exp_avg": torch.zeros(7)}, ValueError, "exp_avg .7 elements"),
    ({"grads": [torch.randn(5), torch.randn(4)]}, ValueError, "9 elements, more than master's 8"),
    ({"grads": [torch.arange(3)]}, TypeError, r"grads\[0\] must be a floating tensor"),
    ({"lowp": torch.zeros(9, dtype=torch.bfloat16)}, ValueError, "lowp must be a 1-D floating tensor as long"),
    ({"step": 1}, TypeError, "step must be a one-element float tensor"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas \(0.9, 1.0\)"),
    ({"lr": -1.0}, ValueError, "lr -1.0"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input_is_named(_built, backend, over, error, match):
    args, kw = _args(**over)
    with pytest.raises(error, match=match):
        adamw_step(*args, backend=backend, **kw)


def test_compiled_op_checks_its_own_arguments(_built):
    op = cpu_ops()["adamw"]
    master = torch.zeros(8)
    with pytest.raises(ValueError, match="reaches past master"):
        op.adamw_step([torch.randn(4)], [6], master, torch.zeros(8), torch.zeros(8), None, torch.tensor(1.0), None,
                      1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(ValueError, match="same length"):
        op.adamw_step([torch.randn(4)], [], master, torch.zeros(8), torch.zeros(8), None, torch.tensor(1.0), None,
                      1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(ValueError, match="grad_multiplier must be a one-element fp32"):
        op.adamw_step([torch.randn(4)], [0], master, torch.zeros(8), torch.zeros(8), None, torch.tensor(1.0),
                      torch.ones(2), 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
