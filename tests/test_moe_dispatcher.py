"""The overlapped dispatch's pieces on CPU: device-side counts against a brute-force count, and the config
option's validation. (Its numerics against the ep=1 reference: tests/test_moe_ep.py, chunk cases.)"""
import pytest
import torch

from piper_ds.moe import PiperMoE
from piper_ds.moe.dispatcher import chunk_counts
from piper_ds.moe.placement import ExpertPlacement


@pytest.mark.parametrize("T,E,K,R,chunks", [(0, 8, 2, 2, 3), (1, 8, 1, 4, 1), (37, 16, 4, 4, 2), (50, 64, 6, 4, 7),
                                            (9, 6, 3, 3, 4)])
def test_chunk_counts_match_a_brute_force_count(T, E, K, R, chunks):
    g = torch.Generator().manual_seed(T + E)
    idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices if T else torch.zeros(0, K, dtype=torch.int64)
    idx[torch.rand(T, K, generator=g) < 0.2] = -1  # dropped assignments
    placement = ExpertPlacement(E, R)
    got = chunk_counts(idx, placement, chunks)
    assert got.shape == (R, chunks, 2) and got.dtype == torch.int64
    for c, part in enumerate(idx.tensor_split(chunks)):
        for r in range(R):
            on_r = [[e >= 0 and int(placement.rank_of[e]) == r for e in row.tolist()] for row in part]
            assert got[r, c, 0] == sum(any(row) for row in on_r), (c, r)
            assert got[r, c, 1] == sum(sum(row) for row in on_r), (c, r)


def test_overlap_chunks_is_validated():
    with pytest.raises(ValueError, match="overlap_chunks"):
        PiperMoE(8, 4, 8, overlap_chunks=0)
    with pytest.raises(ValueError, match=r"overlap_chunks \(2\) needs transport 'flat' or 'auto'"):
        PiperMoE(8, 4, 8, overlap_chunks=2, transport="hierarchical")
    assert PiperMoE(8, 4, 8).config.overlap_chunks == 1
