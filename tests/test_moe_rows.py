"""The atomic-free row ops of the dispatcher against the PyTorch references (float64 gradcheck too)."""
import pytest
import torch

from piper_ds.moe import dispatch, rows
from piper_ds.ops import reference as R


def _positions(n_rows, fan, n, gen):
    return torch.randperm(n_rows * fan, generator=gen)[:n]


# (50, 8, 20, 5) is sparse enough (rows * fan > DENSE_LIMIT * n) to take the index_add path
@pytest.mark.parametrize("n_rows, fan, n, d", [(7, 3, 12, 5), (1, 1, 1, 3), (9, 4, 0, 6), (33, 8, 100, 17),
                                             (50, 8, 20, 5)])
def test_gather_and_combine_match_reference(n_rows, fan, n, d):
    gen = torch.Generator().manual_seed(n_rows * 31 + n)
    pos = _positions(n_rows, fan, n, gen)
    x = torch.randn(n_rows, d, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(rows.gather_rows(x, pos, fan), R.permute_rows_reference(x, pos // fan))
    torch.testing.assert_close(rows.combine_rows(y, pos, n_rows, fan, w),
                               R.combine_rows_reference(y, pos // fan, n_rows, w))
    torch.testing.assert_close(rows.combine_rows(y, pos, n_rows, fan),
                               R.combine_rows_reference(y, pos // fan, n_rows))
    assert torch.autograd.gradcheck(lambda x: rows.gather_rows(x, pos, fan), (x, ))
    assert torch.autograd.gradcheck(lambda y, w: rows.combine_rows(y, pos, n_rows, fan, w), (y, w))


@pytest.mark.parametrize("T, K, E, ep", [(50, 3, 8, 4), (1, 1, 4, 2), (0, 2, 4, 2), (33, 6, 64, 1)])
def test_dispatch_planning_equals_reference(T, K, E, ep):
    from piper_ds.moe.placement import ExpertPlacement
    gen = torch.Generator().manual_seed(T + K)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else \
        torch.zeros(0, K, dtype=torch.int64)
    idx[torch.rand(idx.shape, generator=gen) < 0.2] = -1  # dropped assignments
    w = torch.rand(idx.shape, generator=gen)
    placement = ExpertPlacement(E, ep, rank_of=torch.randperm(E, generator=gen) % ep)  # a shuffled placement
    counts, finish = dispatch._send_plan(idx, w, placement)
    fast = finish(int(counts.sum()))
    ref = R.send_plan_reference(idx, w, placement.rank_of, placement.slot_of, ep)
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    slots = ref.slots_SK
    fast_e = dispatch._expand_plan(slots, ref.weights_SK, E // ep)
    ref_e = R.expand_plan_reference(slots, ref.weights_SK, E // ep)
    for a, b in zip(fast_e, ref_e):
        assert torch.equal(a, b)
