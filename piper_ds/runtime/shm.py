"""The shared-memory segments of DeepSpeed's CPU all-reduce, unlinked when a run ends.

On CPU, DeepSpeed 0.19.8's shared-memory all-reduce (``deepspeed/ops/csrc/cpu/comm/shm.cpp``) creates one
segment of about 69 MB per rank, ``/dev/shm/deepspeed_allreduce_buffer_<n>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``,
and never unlinks it: every CPU run (and every multi-process test) leaves them behind until ``/dev/shm`` and
then the machine's memory are full. Unlinking a name once every rank has mapped its peers' segments (after the
run's last barrier) frees the memory when the processes exit and changes nothing for them.
"""
from __future__ import annotations

import glob
import os
from typing import Iterable, Optional

SHM_DIR = "/dev/shm"


def unlink_allreduce_buffers(addr: str, port: int, ranks: Optional[Iterable[int]] = None) -> int:
    """Unlinks the segments of the job at ``addr``:``port`` (of ``ranks``; None: every rank); returns how many.
    Only call it when no rank of that job will open a peer's segment again."""
    wanted = None if ranks is None else {str(int(r)) for r in ranks}
    removed = 0
    for path in glob.glob(os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_*_{glob.escape(addr)}_{int(port)}_*")):
        if wanted is not None and path.rsplit("_", 1)[1] not in wanted:
            continue
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:  # another rank's cleanup got there first
            pass
    return removed
