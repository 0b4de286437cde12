"""Fused gating and token permutation kernels vs PyTorch: ``python -m piper_ds.bench.kernels [--out DIR]``.

Gating: :func:`piper_ds.ops.fused_gating` (CUDA op) against ``gating_reference`` (the PyTorch sequence) at
(16384 tokens, 256 experts, top-8, 8 groups of which 4 kept, sigmoid, bias, scaling 2.5) and (8192, 64, top-6,
softmax), fp32 and bf16 logits, forward and forward+backward. Rows: ``expand_rows`` (tokens copied out to their
K expert rows) and ``reduce_rows`` (the weighted combine; fwd+bwd adds its one-pass backward: gradient rows and
weight gradients) along a route plan's fan index at T=16384, K=8, D in {2048, 7168}, bf16, against the PyTorch
references; SwiGLU forward and backward (with the activation recomputed) at N=49152, F=1408 against PyTorch's
silu * up and its autograd. Achieved bandwidth (bytes read + written, counted once) against a device-to-device
copy measured in the same run.

Method: CUDA events around every call (launch overhead included), warm-up first, the median of the timed
calls, inputs drawn fresh (non-zero random) and cycled from a pool larger than the L2 cache, and every
configuration checked against the reference before timing. Results go to ``--out``/kernels.json when given;
the table prints last. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import datetime, timezone
from typing import Callable, Dict, List, Sequence

import torch

from piper_ds.bench.common import commit, seconds_per_call
from piper_ds.ops import activation_backward, activation_forward, expand_rows, fused_gating, reduce_rows, route_plan
from piper_ds.ops.reference import (activation_reference, expand_rows_reference, gating_reference,
                                    reduce_rows_reference)

GATING_CASES = [  # name, T, E, K, score_func, n_groups, topk_groups, bias, scaling
    ("16384x256 top8 g8/4 sigmoid", 16384, 256, 8, "sigmoid", 8, 4, True, 2.5),
    ("8192x64 top6 softmax", 8192, 64, 6, "softmax", 1, 1, False, 1.0),
]
ROW_CASES = [(16384, 8, 2048), (16384, 8, 7168)]  # T, K, D (bf16)
L2_BYTES = 64 << 20
DEVICE, BACKEND = "cuda", "cuda"  # module constants, so that the logic can be dry-run elsewhere


def time_calls(fn: Callable, inputs: Sequence, warmup: int = 5, iters: int = 40) -> float:
    """Median milliseconds of ``fn(inputs[i])`` over ``iters`` calls, each between two CUDA events, queued back
    to back."""
    secs = seconds_per_call(lambda i: fn(inputs[i % len(inputs)]), torch.device(DEVICE), iters, warmup,
                            sync_each=False)
    return 1e3 * statistics.median(secs)


def pool_size(bytes_each: int) -> int:
    """Inputs to cycle through so that one pass exceeds the L2 cache (2 at least, 8 at most)."""
    return max(2, min(8, -(-2 * L2_BYTES // max(bytes_each, 1))))


def check_gating(out, ref, bias) -> str:
    """Same routing up to (near-)ties, same weights where the routing is identical, same scores.

    Random logits hold exact ties (bf16) and near-ties closer than an ulp of the scores, where the kernel and
    the reference may legally pick differently: a row counts as agreeing when the selection scores at the
    chosen experts agree to 1e-6; weights are compared on the rows that chose the same set of experts (a tie
    between experts with different biases gives equal selection scores but different weights).
    """
    sel = ref.scores_TE if bias is None else ref.scores_TE + bias
    a, b = sel.gather(1, out.topk_idx_TK), sel.gather(1, ref.topk_idx_TK)
    agree = torch.isclose(a, b, rtol=1e-6, atol=0.0).all(dim=1).float().mean().item()
    frac = (a == b).all(dim=1).float().mean().item()
    idx_o, order_o = out.topk_idx_TK.sort(dim=1)
    idx_r, order_r = ref.topk_idx_TK.sort(dim=1)
    same = (idx_o == idx_r).all(dim=1)
    w_o, w_r = out.topk_weights_TK.gather(1, order_o), ref.topk_weights_TK.gather(1, order_r)
    wdiff = (w_o - w_r)[same].abs().max().item() if same.any() else 0.0
    sdiff = (out.scores_TE - ref.scores_TE).abs().max().item()
    ok = agree == 1.0 and frac >= 0.99 and wdiff < 1e-5 and sdiff < 1e-5
    return f"{'ok' if ok else 'FAIL'} (rows exact {frac:.5f}, |dw| {wdiff:.1e}, |ds| {sdiff:.1e})"


def bench_gating(name, T, E, K, score_func, G, TG, use_bias, scaling, dtype, backward: bool) -> Dict:
    dev = DEVICE
    bias = (torch.rand(E, device=dev) * 0.1 - 0.05) if use_bias else None
    n = pool_size(T * E * dtype.itemsize)
    pool = [torch.randn(T, E, device=dev, dtype=dtype).requires_grad_(backward) for _ in range(n)]
    grads = [(torch.randn(T, K, device=dev), torch.randn(T, E, device=dev)) for _ in range(n)] if backward else None
    args = (K, score_func, bias, G, TG, True, scaling)
    check = check_gating(fused_gating(pool[0], *args, backend=BACKEND), gating_reference(pool[0], *args), bias)

    def run(fn):
        def call(i):
            out = fn(pool[i], *args)
            if backward:
                gw, gs = grads[i]
                torch.autograd.backward([out.topk_weights_TK, out.scores_TE], [gw, gs])
        return call

    idx = list(range(n))
    fused = time_calls(run(lambda x, *a: fused_gating(x, *a, backend=BACKEND)), idx)
    ref = time_calls(run(gating_reference), idx)
    return {"kind": "gating", "case": name, "dtype": str(dtype).split(".")[-1], "pass": "fwd+bwd" if backward
            else "fwd", "fused_ms": fused, "reference_ms": ref, "speedup": ref / fused, "check": check}


def copy_rate(nbytes: int) -> Dict:
    """Device-to-device copy of ``nbytes``: milliseconds and TB/s counting bytes read + written."""
    src = [torch.randint(1, 100, (nbytes // 2,), device=DEVICE, dtype=torch.int16) for _ in range(2)]
    dst = torch.empty_like(src[0])
    ms = time_calls(lambda s: dst.copy_(s), src)
    return {"bytes": nbytes, "ms": ms, "tb_s": 2 * nbytes / ms / 1e9}


def _reduce_fwd_bwd(reduce: Callable, y, weight, grad):
    """One forward and backward of ``reduce(y, w)`` with y and w requiring grad; grads are not accumulated."""
    y, w = y.detach().requires_grad_(), weight.detach().requires_grad_()
    torch.autograd.backward(reduce(y, w), grad)


def _row(name: str, fn: Callable, ref: Callable, data, nbytes: int, ok: bool, copy_tb_s: float, passes: str):
    fused, reference = time_calls(fn, data), time_calls(ref, data)
    tb_s = nbytes / fused / 1e9
    return {"kind": "rows", "case": name, "fused_ms": fused, "pass": passes, "reference_ms": reference,
            "speedup": reference / fused, "bytes": nbytes, "tb_s": tb_s, "of_copy": tb_s / copy_tb_s,
            "check": "ok" if ok else "FAIL"}


def bench_rows(T: int, K: int, D: int, copy_tb_s: float) -> List[Dict]:
    dev, dtype = DEVICE, torch.bfloat16
    N, esize = T * K, dtype.itemsize
    topk = torch.rand(T, 256, device=dev).topk(K, dim=1).indices  # experts of each token
    pos = route_plan(topk, 256, torch.arange(256, device=dev), BACKEND, num_rows=N).pos_RK
    weight = torch.rand(T, K, device=dev)
    xs = [torch.randn(T, D, device=dev, dtype=dtype) for _ in range(2)]
    ys = [torch.randn(N, D, device=dev, dtype=dtype) for _ in range(2)]
    grad = torch.randn(T, D, device=dev, dtype=dtype)
    ok_e = torch.equal(expand_rows(xs[0], pos, N, backend=BACKEND), expand_rows_reference(xs[0], pos, N))
    fused_r = lambda y, w: reduce_rows(y, pos, w, backend=BACKEND)  # noqa: E731
    ref_r = lambda y, w: reduce_rows_reference(y, pos, w)  # noqa: E731
    ok_r = torch.allclose(fused_r(ys[0], weight).float(), ref_r(ys[0], weight).float(), atol=2e-2, rtol=1e-2)
    ok_b = _grads_agree(fused_r, ref_r, ys[0], weight, grad)
    fwd_bytes = (N + T) * D * esize + N * 12
    case = f"T={T} K={K} D={D} bf16"
    return [
        _row(f"expand_rows {case}", lambda x: expand_rows(x, pos, N, backend=BACKEND),
             lambda x: expand_rows_reference(x, pos, N), xs, (N + T) * D * esize + N * 8, ok_e, copy_tb_s, "fwd"),
        _row(f"reduce_rows {case}", lambda y: fused_r(y, weight), lambda y: ref_r(y, weight), ys, fwd_bytes, ok_r,
             copy_tb_s, "fwd"),
        _row(f"reduce_rows {case}", lambda y: _reduce_fwd_bwd(fused_r, y, weight, grad),
             lambda y: _reduce_fwd_bwd(ref_r, y, weight, grad), ys, fwd_bytes + 3 * N * D * esize + N * 16, ok_b,
             copy_tb_s, "fwd+bwd"),
    ]


def bench_activation(N: int, F: int, copy_tb_s: float) -> List[Dict]:
    """SwiGLU of [N, 2F] bf16 rows: the fused forward, and the fused backward that also recomputes the activation,
    against PyTorch (silu(gate) * up, and its autograd)."""
    dtype, esize = torch.bfloat16, 2
    hs = [torch.randn(N, 2 * F, device=DEVICE, dtype=dtype) for _ in range(2)]
    grad = torch.randn(N, F, device=DEVICE, dtype=dtype)

    def torch_fwd(h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def torch_bwd(h):
        hh = h.detach().requires_grad_()
        torch.autograd.grad(torch_fwd(hh), hh, grad)

    ok_f = torch.allclose(activation_forward(hs[0], "swiglu", BACKEND).float(),
                          activation_reference(hs[0], "swiglu").float(), atol=2e-2, rtol=1e-2)
    got, _ = activation_backward(grad, hs[0], "swiglu", True, BACKEND)
    hh = hs[0].detach().requires_grad_()
    (want, ) = torch.autograd.grad(activation_reference(hh, "swiglu"), hh, grad)
    ok_b = torch.allclose(got.float(), want.float(), atol=2e-2, rtol=1e-2)
    case = f"swiglu N={N} F={F} bf16"
    return [
        _row(case, lambda h: activation_forward(h, "swiglu", BACKEND), torch_fwd, hs, 3 * N * F * esize, ok_f,
             copy_tb_s, "fwd"),
        _row(case, lambda h: activation_backward(grad, h, "swiglu", True, BACKEND), torch_bwd, hs,
             6 * N * F * esize, ok_b, copy_tb_s, "bwd"),
    ]


def _grads_agree(fused: Callable, ref: Callable, y, weight, grad) -> bool:
    """The fused reduce's gradients (y, weight) against the reference's autograd, to bf16 tolerance."""
    out = []
    for fn in (fused, ref):
        yy, ww = y.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        torch.autograd.backward(fn(yy, ww), grad)
        out.append((yy.grad.float(), ww.grad.float()))
    (gy, gw), (ry, rw) = out
    return torch.allclose(gy, ry, atol=2e-2, rtol=1e-2) and torch.allclose(gw, rw, atol=1e-1, rtol=1e-2)


def meta() -> Dict:
    """Date, commit, GPU and versions of the run."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit() or "unknown",
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}


def table(rows: List[Dict], copy: Dict) -> str:
    lines = [f"{'kernel':<44} {'pass':<8} {'fused ms':>9} {'torch ms':>9} {'speedup':>8} {'TB/s':>6} "
             f"{'of copy':>8}  check"]
    for r in rows:
        tb = f"{r['tb_s']:.2f}" if "tb_s" in r else ""
        of = f"{100 * r['of_copy']:.0f}%" if "of_copy" in r else ""
        name = r["case"] + (f" {r['dtype']}" if "dtype" in r else "")
        lines.append(f"{name:<44} {r.get('pass', 'fwd'):<8} {r['fused_ms']:>9.4f} {r['reference_ms']:>9.4f} "
                     f"{r['speedup']:>7.1f}x {tb:>6} {of:>8}  {r['check']}")
    lines.append(f"device-to-device copy of {copy['bytes'] / 2**20:.0f} MiB: {copy['ms']:.4f} ms = "
                 f"{copy['tb_s']:.2f} TB/s (read + write)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m piper_ds.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for kernels.json (none: print only)")
    p.add_argument("--quick", action="store_true", help="one row shape, forward-only gating")
    p.add_argument("--only", choices=("gating", "rows"), default=None, help="run one half of the benchmark")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m piper_ds.bench.kernels needs a CUDA GPU")
    torch.manual_seed(0)
    rows: List[Dict] = []
    for case in (GATING_CASES if args.only != "rows" else []):
        for dtype in (torch.float32, torch.bfloat16):
            for backward in ((False,) if args.quick else (False, True)):
                rows.append(bench_gating(*case, dtype=dtype, backward=backward))
                print(rows[-1], flush=True)
    row_cases = [] if args.only == "gating" else ROW_CASES[:1] if args.quick else ROW_CASES
    copy = copy_rate(max(T * K * D for T, K, D in row_cases or ROW_CASES[:1]) * 2)
    print(copy, flush=True)
    for T, K, D in row_cases:
        rows += bench_rows(T, K, D, copy["tb_s"])
        print(rows[-3:], flush=True)
    if args.only != "gating":
        rows += bench_activation(49152, 1408, copy["tb_s"])
    report = {"meta": meta(), "copy": copy, "results": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(table(rows, copy))
    return 1 if any(r["check"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
