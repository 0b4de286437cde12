"""A small multi-process harness for gloo tests on CPU (and NCCL on GPUs).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` spawned processes that rendezvous through a
file store, sets the launcher variables DeepSpeed reads (RANK, WORLD_SIZE, LOCAL_RANK, ...), calls
``fn(rank, world_size, *args)`` in each and returns the list of their results (rank order). A worker that
raises makes the whole call raise with that worker's traceback; a run that outlives ``timeout`` seconds is
killed and raises ``TimeoutError`` — a hang never passes silently, and no GPU is ever required.
"""
from __future__ import annotations

import io
import os
import socket
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable, List

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, store_path: str, port: int, backend: str, queue, fn, args) -> None:
    import torch
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=120))
        result = fn(rank, world_size, *args)
        # serialise to bytes: tensors shared through file descriptors die with the worker process
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report every failure, also SystemExit/KeyboardInterrupt in a worker
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:  # import DeepSpeed only if the test did: it costs seconds per process on a small machine
            import sys
            ds_comm = sys.modules.get("deepspeed.comm")
            if ds_comm is not None and ds_comm.is_initialized():
                ds_comm.destroy_process_group()
            elif dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 240.0,
                    backend: str = "gloo") -> List[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; returns their results by rank.

    ``fn`` and its arguments must be picklable (a module-level function). Raises RuntimeError naming the rank
    that failed, or TimeoutError when the processes do not finish within ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, port, backend, queue, fn, args),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, {}
        import time
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            if not queue.empty():
                rank, status, payload = queue.get()
                (results if status == "ok" else errors)[rank] = payload
                if errors:
                    break
                continue
            if time.monotonic() > deadline:
                break
            if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                time.sleep(0.5)  # a dying worker may still be writing its traceback
                if queue.empty():
                    break
            time.sleep(0.02)
        for p in procs:
            p.join(timeout=5 if not errors and len(results) == world_size else 0.1)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        codes = {r: procs[r].exitcode for r in missing}
        raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s "
                           f"(exit codes {codes}): a hang or a crash")
    import torch
    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world_size)]
