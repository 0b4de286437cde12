"""Micro-benchmark of DeepSpeed's ZeRO ``engine.step()`` on one GPU, for the planner's optimizer term.

The planner's analytic optimizer term (:func:`piper_ds.planner.resources.optimizer_seconds`) counts the HBM
bytes of ZeRO's ``step()`` and of one AdamW pass. On H200 the real step took about 1.6x that, and the gap was
the same per parameter on 1 and 4 GPUs, so ``python -m piper_ds.bench.calibrate`` measures it instead: a DeepSpeed
engine over a model of plain bf16 tensors, the planner's own ds_config blocks (bf16, ZeRO-1 with one rank,
torch's fused AdamW as the layout benchmark and ds_configs/h200_x*.json use it, gradient clipping 1.0),
random gradients, and the median seconds of ``engine.step()`` divided by the parameters updated. It runs in a child process with a world of one rank, so
that the data-parallel group (what ZeRO shards over) is this GPU alone whatever job launched the calibration.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from typing import Any, Dict

import torch
from torch import nn

from piper_ds.testing import free_port

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
           port: int) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        import deepspeed

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
        sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        model = _Params(tensors, numel)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
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
                    timeout_s: float = 600.0, tensor_numel: int = TENSOR_NUMEL) -> Dict[str, Any]:
    """Seconds per updated parameter of one ZeRO-1 ``engine.step()`` on ``device`` alone.

    ``numel``: parameters of the benchmark model, in tensors of ``tensor_numel`` (rounded down, at least one
    tensor; 2**30 = 16 GiB of model states). On CPU it runs fp32 with torch's default AdamW: a smoke test of
    the harness, not a figure for the planner. Returns ``{"ns_per_param", "numel", "seconds", "times_s"}``.
    RuntimeError when the child fails or outlives ``timeout_s``.
    """
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the ZeRO step benchmark runs on CUDA (or CPU for tests), got {device}")
    if numel < 1 or tensor_numel < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"bench_zero_step needs numel, tensor_numel, iters >= 1 and warmup >= 0, got "
                         f"numel={numel}, tensor_numel={tensor_numel}, iters={iters}, warmup={warmup}")
    tensors = max(1, numel // tensor_numel)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, device.type, device.index or 0, tensors, tensor_numel, warmup,
                                            iters, free_port()))
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
    return {"ns_per_param": result["seconds"] / n * 1e9, "numel": n, **result}
