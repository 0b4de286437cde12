"""Micro-benchmark of the ZeRO ``engine.step()`` on one GPU: piper_ds's fused step beside DeepSpeed's own.

A ``PiperEngine`` over a model of plain bf16 tensors, with the planner's own ds_config blocks (bf16, ZeRO-1 with
one rank, torch's fused AdamW as the layout benchmark and ds_configs/h200_x*.json use it, gradient clipping 1.0),
random gradients, and the median seconds of ``engine.step()`` divided by the parameters updated. ``step``
chooses the engine's step (``piper.optimizer.fused_step``): "fused" (the library's default,
:mod:`piper_ds.runtime.zero_step`) or "deepspeed" (DeepSpeed's ``DeepSpeedZeroOptimizer.step``, the step every
DeepSpeed peer, stock MoE and AutoEP, runs). The planner's calibration (``python -m piper_ds.bench.calibrate``)
measures the fused step, what users run. Each measurement runs in a child process with a world of one rank, so
that the data-parallel group (what ZeRO shards over) is this GPU alone whatever job launched it.

    python -m piper_ds.bench.zero_step --numel 1073741824 --out docs/results/zero_step_h200_x1.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from piper_ds.planner.resources import fused_step_bytes_per_param
from piper_ds.testing import free_port

#: The steps the benchmark compares: piper_ds's fused step and DeepSpeed's own.
STEPS = ("fused", "deepspeed")

#: HBM bytes per bf16 parameter of the fused step, the planner's count: the norm reads the gradient (2), the
#: update reads it again (2), reads and writes the fp32 master and both moments (24) and writes the bf16 weight (2).
FUSED_STEP_BYTES_PER_PARAM = fused_step_bytes_per_param("bf16")

#: Elements per parameter tensor: one expert stack of the reference model is 64 x 2048 x 1408 (185M); the
#: dense tensors are 4M..65M. 2**25 keeps a tensor's own launches negligible, like the real groups.
TENSOR_NUMEL = 1 << 25


class _Params(nn.Module):
    """``n`` tensors of ``numel`` elements; ``forward(c)`` = sum_i (p_i * c_i).sum(), so the gradient of p_i
    is the fresh random tensor c_i."""

    def __init__(self, n: int, numel: int):
        super().__init__()
        self.ps = nn.ParameterList(nn.Parameter(torch.randn(numel) * 0.02) for _ in range(n))

    def forward(self, cs):
        return sum((p * c).sum() for p, c in zip(self.ps, cs))


def _child(queue, device_type: str, device_index: int, tensors: int, numel: int, warmup: int, iters: int,
           port: int, step: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        import piper_ds
        from piper_ds.planner.dsconfig import build_ds_config
        from piper_ds.system.layout import Layout
        from piper_ds.system.specs import ModelSpec
        cuda = device_type == "cuda"
        if cuda:
            torch.cuda.set_device(device_index)
        device = torch.device(device_type, device_index) if cuda else torch.device("cpu")
        # CPU (smoke tests only): fp32 and torch's default AdamW, the CPU path of DeepSpeed's engine
        layout = Layout(dp=1, zero_stage=1, precision="bf16" if cuda else "fp32")
        cfg = {k: v for k, v in build_ds_config(ModelSpec.preset("tiny"), layout).items() if k != "piper"}
        cfg["optimizer"]["params"].update({"torch_adam": True, "fused": cuda})
        cfg["piper"] = {"optimizer": {"fused_step": "on" if step == "fused" else "off"},
                        "runtime": {"heartbeat": False}}
        sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        model = _Params(tensors, numel)
        engine, *_ = piper_ds.initialize(model=model, config=cfg)
        dtype = torch.bfloat16 if cuda else torch.float32
        times = []
        for i in range(warmup + iters):
            cs = [torch.randn(numel, device=device, dtype=dtype) for _ in range(tensors)]
            engine.backward(engine(cs))
            del cs
            sync()
            t0 = time.perf_counter()
            engine.step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        queue.put({"seconds": statistics.median(times), "times_s": times})
    except Exception as exc:  # reported by the parent, which raises
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def bench_zero_step(device: torch.device, numel: int = 1 << 30, warmup: int = 2, iters: int = 5,
                    timeout_s: float = 600.0, tensor_numel: int = TENSOR_NUMEL, step: str = "fused") -> Dict[str, Any]:
    """Seconds per updated parameter of one ZeRO-1 ``engine.step()`` on ``device`` alone; ``step``: one of
    :data:`STEPS`.

    ``numel``: parameters of the benchmark model, in tensors of ``tensor_numel`` (rounded down, at least one
    tensor; 2**30 = 16 GiB of model states). On CPU it runs fp32 with torch's default AdamW: a smoke test of
    the harness, not a figure for the planner. Returns ``{"ns_per_param", "numel", "seconds", "times_s",
    "step"}``.
    RuntimeError when the child fails or outlives ``timeout_s``.
    """
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the ZeRO step benchmark runs on CUDA (or CPU for tests), got {device}")
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if numel < 1 or tensor_numel < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"bench_zero_step needs numel, tensor_numel, iters >= 1 and warmup >= 0, got "
                         f"numel={numel}, tensor_numel={tensor_numel}, iters={iters}, warmup={warmup}")
    tensors = max(1, numel // tensor_numel)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, device.type, device.index or 0, tensors, tensor_numel, warmup,
                                            iters, free_port(), step))
    proc.start()
    try:
        result = queue.get(timeout=timeout_s)
    except Exception as exc:
        proc.kill()
        raise RuntimeError(f"ZeRO step benchmark gave no result within {timeout_s:.0f} s "
                           f"(exit code {proc.exitcode})") from exc
    proc.join(timeout=60)
    if "error" in result:
        raise RuntimeError(f"ZeRO step benchmark failed: {result['error']}")
    n = tensors * tensor_numel
    return {"ns_per_param": result["seconds"] / n * 1e9, "numel": n, "step": step, **result}


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """``python -m piper_ds.bench.zero_step``: both steps on this GPU, one record each, a table last."""
    from piper_ds.bench.common import commit, device_name
    ap = argparse.ArgumentParser(prog="python -m piper_ds.bench.zero_step", description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 30, help="parameters updated (default 2**30)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    ap.add_argument("--tensor-numel", type=int, default=TENSOR_NUMEL, help="elements per parameter tensor")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON file for the records")
    args = ap.parse_args(argv)
    steps = args.steps.split(",")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; steps: {list(STEPS)}")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    meta = dict(command="python -m piper_ds.bench.zero_step " + " ".join(argv if argv is not None else sys.argv[1:]),
                commit=commit(), gpu=device_name(device), torch=torch.__version__, dtype="bf16" if
                device.type == "cuda" else "fp32", zero_stage=1, clipping=1.0)
    records = []
    for step in steps:
        r = bench_zero_step(device, numel=args.numel, warmup=args.warmup, iters=args.iters, step=step,
                            tensor_numel=args.tensor_numel)
        records.append({**meta, "peer": "piper" if step == "fused" else "deepspeed", "step": step,
                        "numel": r["numel"], "ms": r["seconds"] * 1e3, "ns_per_param": r["ns_per_param"],
                        "times_s": r["times_s"],
                        # the bytes the fused step must move over the time taken: how near the HBM rate it runs
                        "fused_bytes_GBps": FUSED_STEP_BYTES_PER_PARAM * r["numel"] / r["seconds"] / 1e9})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    print(f"{'step':<10} {'params':>8} {'ms':>9} {'ps/param':>9} {'GB/s':>7}  (GB/s: the fused step's "
          f"{FUSED_STEP_BYTES_PER_PARAM} B/param over the time)")
    for r in records:
        print(f"{r['step']:<10} {r['numel'] / 1e9:>7.2f}B {r['ms']:>9.2f} {r['ns_per_param'] * 1e3:>9.2f} "
              f"{r['fused_bytes_GBps']:>7.0f}")
    return records


if __name__ == "__main__":
    main()
