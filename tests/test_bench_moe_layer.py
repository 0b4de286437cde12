"""The MoE-layer benchmark's all-to-all accounting (piper_ds.bench.moe_layer), on CPU: rows sent to other EP
ranks counted from the routing equal a brute-force count over tokens and ranks."""
import pytest
import torch

from piper_ds.bench.moe_layer import rows_to_other_ranks
from piper_ds.moe.placement import ExpertPlacement


@pytest.mark.parametrize("T,K,E,ep", [(0, 2, 8, 2), (1, 1, 4, 4), (37, 3, 8, 2), (64, 6, 16, 4)])
def test_rows_to_other_ranks_equals_a_brute_force_count(T, K, E, ep):
    gen = torch.Generator().manual_seed(T * 100 + K)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.empty(0, K).long()
    idx[torch.rand(idx.shape, generator=gen) < 0.2] = -1  # dropped assignments go nowhere
    placement = ExpertPlacement(E, ep)
    rank_of = placement.rank_of
    for me in range(ep):
        expected = sum(len({int(rank_of[e]) for e in row if e >= 0} - {me}) for row in idx.tolist())
        assert rows_to_other_ranks(idx, placement, me) == expected
