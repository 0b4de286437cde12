"""One-line messages of the runtime to the user: ``[piper_ds] ...`` on stderr, from rank 0 only (every rank
knows the same thing; one copy is enough)."""
from __future__ import annotations

import os
import sys


def rank() -> int:
    """This process's global rank: the process group's when initialised, else the launcher's RANK (0)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def say(message: str, all_ranks: bool = False) -> None:
    """Prints ``[piper_ds] message`` to stderr (flushed) on rank 0, or on every rank with ``all_ranks``
    (then prefixed with the rank)."""
    r = rank()
    if all_ranks:
        print(f"[piper_ds] [rank {r}] {message}", file=sys.stderr, flush=True)
    elif r == 0:
        print(f"[piper_ds] {message}", file=sys.stderr, flush=True)
