"""DeepSpeed's CPU all-reduce leaves a ~69 MB segment per rank in /dev/shm; the test harness and
piper_ds.shutdown unlink them (piper_ds.runtime.shm)."""
import glob
import os

import torch

from piper_ds.runtime import shm
from piper_ds.testing import run_distributed


def test_unlink_picks_the_job_and_the_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path))
    names = [f"deepspeed_allreduce_buffer_0_127.0.0.1_{port}_{rank}" for port in (29500, 29501) for rank in (0, 1, 10)]
    for name in names + ["other_127.0.0.1_29500_0"]:
        (tmp_path / name).write_bytes(b"x")
    assert shm.unlink_allreduce_buffers("127.0.0.1", 29500, [1]) == 1
    assert shm.unlink_allreduce_buffers("127.0.0.1", 29500) == 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(n for n in names if "_29501_" in n) + ["other_127.0.0.1_29500_0"]


def _allreduce(rank, world):
    import deepspeed
    import deepspeed.comm as dist
    os.environ["LOCAL_SIZE"] = str(world)  # what DeepSpeed's launcher sets: all ranks local, so shm all-reduce
    deepspeed.init_distributed(dist_backend="gloo")
    t = torch.ones(4) * (rank + 1)
    dist.all_reduce(t)
    dist.barrier()
    mine = glob.glob(os.path.join(shm.SHM_DIR, f"deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*"))
    return float(t[0]), len(mine)


def test_a_distributed_run_leaves_no_segments_behind():
    pattern = os.path.join(shm.SHM_DIR, "deepspeed_allreduce_buffer_*")
    before = set(glob.glob(pattern))
    results = run_distributed(_allreduce, 2, timeout=240)
    assert [r[0] for r in results] == [3.0, 3.0]
    assert results[0][1] == 2  # DeepSpeed made one segment per rank during the run (else this tests nothing)
    assert set(glob.glob(pattern)) <= before


_KILLED_RANK = """
import os, sys, time
rank = int(os.environ["RANK"])
path = os.path.join(sys.argv[1], f"deepspeed_allreduce_buffer_0_127.0.0.1_{os.environ['MASTER_PORT']}_{rank}")
open(path, "wb").close()  # the segment a rank's DeepSpeed CPU all-reduce would have made
if rank == 0:  # fail once rank 1's segment exists, so the harness has one to clean up
    while not os.path.exists(path[:-1] + "1"):
        time.sleep(0.01)
    sys.exit(1)
time.sleep(600)  # killed by the harness, so it never cleans up after itself
"""


def test_launched_ranks_that_are_killed_leave_no_segments_behind(tmp_path, monkeypatch):
    from piper_ds.testing import launch_ranks
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path))
    script = tmp_path / "rank.py"
    script.write_text(_KILLED_RANK)
    runs = launch_ranks([str(script), str(tmp_path)], 2, timeout=60, grace=0.5)
    assert [r.returncode for r in runs][0] == 1 and runs[1].returncode != 0  # rank 1 was killed
    assert not list(tmp_path.glob("deepspeed_allreduce_buffer_*"))
