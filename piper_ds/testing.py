"""A small multi-process harness for gloo tests on CPU (and NCCL on GPUs).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` spawned processes that rendezvous through a
file store, sets the launcher variables DeepSpeed reads (RANK, WORLD_SIZE, LOCAL_RANK, ...), calls
``fn(rank, world_size, *args)`` in each and returns the list of their results (rank order). A worker that
raises makes the whole call raise with that worker's traceback; a run that outlives ``timeout`` seconds is
killed and raises ``TimeoutError`` — a hang never passes silently, and no GPU is ever required.

``launch_ranks(argv, world_size, timeout)`` runs a script as the ranks of one job in separate processes (what
the deepspeed launcher does), returning each rank's exit code and output: for fault-injection tests where a
rank is killed or stopped on purpose.
"""
from __future__ import annotations

import io
import os
import socket
import tempfile
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

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
        from piper_ds.runtime.shm import unlink_allreduce_buffers
        unlink_allreduce_buffers("127.0.0.1", port)  # DeepSpeed's CPU all-reduce segments of these ranks
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


@dataclass
class RankRun:
    """One rank of :func:`launch_ranks`: exit code (negative: killed by that signal), output (stdout and stderr
    together) and the wall-clock time (``time.time()``) at which it was seen ending."""

    rank: int
    returncode: int
    output: str
    ended_at: float


def launch_ranks(argv: List[str], world_size: int, timeout: float, env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None, grace: float = 10.0) -> List[RankRun]:
    """Runs ``python *argv`` as ``world_size`` ranks of one job (the launcher variables set, TCP rendezvous on
    a free port), like ``deepspeed --num_gpus N`` without the launcher, so that a test sees every rank's exit
    code and output on its own. Once a rank ends with a non-zero code the others get ``grace`` seconds, then
    are killed (SIGKILL, the one signal a stopped process obeys). Raises TimeoutError (after killing all)
    when they do not end within ``timeout`` seconds."""
    import subprocess
    import sys
    import time
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs, logs = [], []
        for rank in range(world_size):
            rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=cwd, env=rank_env, stdout=log,
                                          stderr=subprocess.STDOUT))
        ended: Dict[int, float] = {}
        deadline, kill_at = time.monotonic() + timeout, None
        while len(ended) < world_size and time.monotonic() < deadline:
            for rank, proc in enumerate(procs):
                if rank not in ended and proc.poll() is not None:
                    ended[rank] = time.time()
                    if proc.returncode != 0 and kill_at is None:
                        kill_at = time.monotonic() + grace
            if kill_at is not None and time.monotonic() > kill_at:
                break
            time.sleep(0.05)
        alive = [r for r, p in enumerate(procs) if p.poll() is None]
        for rank in alive:
            procs[rank].kill()
            procs[rank].wait()
            ended.setdefault(rank, time.time())
        from piper_ds.runtime.shm import unlink_allreduce_buffers
        unlink_allreduce_buffers("127.0.0.1", port)  # a killed rank never unlinks its own segments
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    if kill_at is None and alive:
        tails = "\n".join(f"--- rank {r} ---\n{outputs[r][-3000:]}" for r in alive)
        raise TimeoutError(f"ranks {alive} of {world_size} did not end within {timeout:.0f}s:\n{tails}")
    return [RankRun(r, procs[r].returncode, outputs[r], ended[r]) for r in range(world_size)]


def assert_same_function(module, twin, x, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Asserts that ``module`` and ``twin`` (the same parameters, in the same order) give close outputs on ``x``
    and close gradients of x and of every parameter, for one random output gradient."""
    import torch
    x = x.detach().requires_grad_(True)
    y, y_twin = module(x), twin(x)
    torch.testing.assert_close(y, y_twin, rtol=rtol, atol=atol)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *module.parameters()], g)
    want = torch.autograd.grad(y_twin, [x, *twin.parameters()], g)
    for name, a, b in zip(["x", *(n for n, _ in module.named_parameters())], got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
