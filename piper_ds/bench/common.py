"""What every measurement tool needs: timing of one call on the device, marks on the device's queue (:class:`Clock`),
the distributed start of a benchmark launch, and the metadata of a record (commit, device name)."""
from __future__ import annotations

import os
import subprocess
import time
from typing import Callable, List, Optional, Tuple

import torch

from piper_ds.testing import free_port


def sync(device: Optional[torch.device] = None) -> None:
    """Waits for the device's queued work (no-op on CPU)."""
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[int], object], device: torch.device, iters: int, warmup: int = 0, *,
                     clock: str = "events", sync_each: bool = True,
                     before: Optional[Callable[[], object]] = None) -> List[float]:
    """Seconds of each of ``iters`` calls ``fn(i)``, i = 0, 1, ..., after ``warmup`` untimed calls ``fn(i)``.

    ``clock``: 'events' times each call between two CUDA events on a GPU (the host clock on CPU, after waiting
    for the device); 'host': the host clock around the call and a wait for the device. ``sync_each`` False
    (events only): the calls are queued back to back and the events read after the last one, so the host's
    launch time hides behind the device's work. ``before``: called before each timed call, untimed (a barrier).
    """
    if clock not in ("events", "host"):
        raise ValueError(f"clock must be 'events' or 'host', got {clock!r}")
    for i in range(warmup):
        fn(i)
    sync(device)
    events = clock == "events" and device.type == "cuda"
    times: List[float] = []
    marks = []
    for i in range(iters):
        if before is not None:
            before()
        if events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            marks.append((start, end))
            if sync_each:
                end.synchronize()
        else:
            t0 = time.perf_counter()
            fn(i)
            sync(device)
            times.append(time.perf_counter() - t0)
    if events:
        sync(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in marks]
    return times


def init_distributed(cuda: bool) -> Tuple[int, int]:
    """Starts the process group from the launcher's variables, a world of one under a plain ``python -m``: NCCL
    with this rank's local GPU pinned, or gloo on CPU. Returns (rank, world size)."""
    import deepspeed
    import deepspeed.comm as dist
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def commit() -> Optional[str]:
    """The checkout's commit for a record: ``PIPER_COMMIT`` when set (a tree copied without its git folder),
    else ``git rev-parse --short HEAD``; None when neither is known."""
    if os.environ.get("PIPER_COMMIT"):
        return os.environ["PIPER_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Clock:
    """Marks on the device's queue: CUDA events recorded on the current stream on a GPU, the host clock on CPU.
    Read :meth:`seconds` after the device has reached both marks (after a synchronisation)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start
