"""Tier 3: FlatAllToAll.start (an exchange left in flight) equals the synchronous exchange on gloo, outputs and
gradients, with several exchanges in flight at once and work between start and wait."""
import pytest
import torch
import torch.distributed as dist

from piper_ds.comm.alltoall import FlatAllToAll
from piper_ds.testing import run_distributed


def _exchange_worker(rank, world_size):
    flat = FlatAllToAll(dist.group.WORLD)
    g = torch.Generator().manual_seed(7)
    C = torch.randint(0, 5, (world_size, world_size), generator=g)  # zeros included
    C[0] = 0  # rank 0 sends nothing
    send, recv = C[rank].tolist(), C[:, rank].tolist()
    gx = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(sum(send), 3, generator=gx, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(sum(recv), 3, generator=gx, dtype=torch.float64) for _ in range(2)]

    def loss(ys):
        return sum((y * w).sum() for y, w in zip(ys, ws))

    sync_x = [x.clone().requires_grad_(True) for x in xs]
    sync_y = [flat(x, send, recv) for x in sync_x]
    loss(sync_y).backward()
    async_x = [x.clone().requires_grad_(True) for x in xs]
    pending = [flat.start(x, send, recv) for x in async_x]  # two in flight
    busy = torch.randn(64, 64, dtype=torch.float64) @ torch.randn(64, 64, dtype=torch.float64)  # work meanwhile
    async_y = [p.wait() for p in pending]
    loss(async_y).backward()
    for a, b in zip(sync_y + [x.grad for x in sync_x], async_y + [x.grad for x in async_x]):
        assert torch.equal(a.detach(), b.detach())
    with pytest.raises(RuntimeError, match="already called"):
        pending[0].wait()
    return busy.shape[0]


@pytest.mark.parametrize("world_size", [2, 4])
def test_async_exchange_equals_the_synchronous_one(world_size):
    assert run_distributed(_exchange_worker, world_size, timeout=120) == [64] * world_size


def test_a_group_of_one_hands_the_rows_back():
    x = torch.randn(5, 2, requires_grad=True)
    y = FlatAllToAll(None).start(x, [5], [5]).wait()
    assert y is x
