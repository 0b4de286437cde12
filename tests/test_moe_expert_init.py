"""GroupedExperts' weight draw: seeded per (seed, global expert id, matrix), replaceable inside a block."""
import torch

from piper_ds.moe import MoEConfig
from piper_ds.moe.experts import INIT_STD, GroupedExperts, seeded_draw, weight_draw


def _experts(ids):
    return GroupedExperts(4, 3, len(ids), MoEConfig(kernels="reference"), "ep_size_1", ids, init_seed=1)


def test_the_draw_follows_the_global_id_and_the_hook_replaces_it_inside_its_block():
    plain = _experts([5, 7])
    assert torch.equal(plain.w_down[1], seeded_draw((3, 4), 1, 7, "w2"))
    assert torch.equal(_experts([7]).w_up[0], plain.w_up[1])  # expert 7 alone, in another slot: same weights
    assert 0.5 * INIT_STD < float(plain.w_up.detach().std()) < 2 * INIT_STD
    with weight_draw(lambda shape, seed, expert, name: torch.full(shape, float(expert))):
        hooked = _experts([5, 7])
    assert torch.equal(hooked.w_down[1], torch.full((3, 4), 7.0))
    assert torch.equal(hooked.w_up[0], torch.full((4, 6), 5.0))
    assert torch.equal(_experts([5, 7]).w_down, plain.w_down)  # the block ended: the seeded draw again
