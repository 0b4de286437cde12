"""Expert migration's pure parts: the shared bytes/saving rules (piper_ds.system.migration), the greedy swap
planner on hand-made loads, and the "piper.balance" config block."""
import math

import pytest

from piper_ds.balance.planner import greedy_swaps, max_over_mean, plan_layer, rank_loads
from piper_ds.config import BalanceConfig, parse_piper_config
from piper_ds.system.migration import (DEFAULT_P2P_GBPS, DEFAULT_WINDOW, break_even_ratio, expert_migration_bytes,
                                       migration_saving_seconds, transfer_seconds)

CONTIGUOUS_8x2 = [0, 0, 0, 0, 1, 1, 1, 1]


# ------------------------------------------------------------------------------------------- shared rules
def test_expert_bytes_rule():
    assert expert_migration_bytes(1000) == 16_000  # bf16 weight + grad, fp32 master + two moments: Table IV
    assert expert_migration_bytes(1000, with_grads=False) == 14_000  # right after an optimizer step
    # the runtime's mover: the receiver casts the weights from the master copy, so only 12 B/param travel
    assert expert_migration_bytes(1000, with_grads=False, weights_from_master=True) == 12_000
    for from_master in (False, True):  # fp32 without a master copy: the weights themselves and the moments
        assert expert_migration_bytes(1000, weight_bytes=4, master_copy=False, with_grads=False,
                                      weights_from_master=from_master) == 12_000
    for bad in ({"expert_params": 0}, {"expert_params": 10, "weight_bytes": 0}, {"expert_params": 10,
                                                                                 "weight_bytes": 1.5}):
        with pytest.raises(ValueError, match=str(list(bad.values())[-1])):
            expert_migration_bytes(**bad)


def test_saving_cost_and_break_even():
    assert transfer_seconds(50e9, 50.0) == pytest.approx(1.0)
    # a layer of 10 ms per step at max/mean 2.0 takes 7.5 ms at 1.5: 2.5 ms saved per step, over 100 steps
    assert migration_saving_seconds(2.0, 1.5, 0.010, 100) == pytest.approx(0.25)
    assert migration_saving_seconds(1.5, 2.0, 0.010, 100) < 0
    # balanced 10 ms per step, a 0.1 s move, a 100-step window: removing an imbalance of 10% pays it back
    assert break_even_ratio(0.1, 0.010, 100) == pytest.approx(1.1)
    # consistency: at the break-even ratio, removing the whole imbalance saves exactly the cost
    r = break_even_ratio(0.05, 0.004, 20)
    assert migration_saving_seconds(r, 1.0, 0.004 * r, 20) == pytest.approx(0.05)
    assert break_even_ratio(1.0, 0.0, 10) == math.inf
    with pytest.raises(ValueError, match="-1"):
        transfer_seconds(-1, 10.0)
    with pytest.raises(ValueError, match="0.5"):
        migration_saving_seconds(0.5, 1.0, 1.0, 1)


# ------------------------------------------------------------------------------------------- planner
def test_rank_loads_and_ratio():
    assert rank_loads([5, 1, 2, 2], [0, 1, 1, 0], 2) == [7, 3]
    assert max_over_mean([7, 3]) == pytest.approx(1.4)
    assert max_over_mean([0, 0, 0]) == 1.0  # nothing counted: nothing to balance
    with pytest.raises(ValueError, match="EP rank 2"):
        rank_loads([1, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="3 expert loads for a placement of 2"):
        rank_loads([1, 1, 1], [0, 1], 2)


def test_greedy_swaps_the_pair_that_best_lowers_the_max():
    loads = [10, 9, 1, 1, 1, 1, 1, 0]  # rank 0: 21, rank 1: 3
    plan = greedy_swaps(loads, CONTIGUOUS_8x2, 2, max_swaps=4)
    # d = 9 brings both to 12: experts 0 (10) with 4 (1) is the smallest (new max, a, b) among d = 9 pairs
    assert plan.swaps == ((0, 4),)
    assert plan.rank_loads == ((21, 3), (12, 12))
    assert plan.senders == ((0, 1),)


def test_greedy_noop_when_balanced_and_for_one_rank():
    assert greedy_swaps([3, 1, 2, 2], [0, 0, 1, 1], 2, max_swaps=4).swaps == ()  # 4 and 4
    assert greedy_swaps([9, 1, 1, 1], [0, 0, 0, 0], 1, max_swaps=4).swaps == ()  # ep = 1: nowhere to move
    # an imbalance no swap can lower: the hot rank's experts are all lighter than or equal to the cold's
    assert greedy_swaps([5, 5, 5, 5], [0, 0, 1, 1], 2, max_swaps=4).swaps == ()
    assert greedy_swaps([9, 0, 8, 8], [0, 0, 1, 1], 2, max_swaps=4).swaps == ()  # 9 vs 16: 8-0 would give 17


def test_greedy_respects_max_swaps_and_moves_an_expert_once():
    loads = [8, 8, 8, 8, 1, 1, 1, 1, 4, 4, 4, 4, 2, 2, 2, 2]
    rank_of = [e // 4 for e in range(16)]  # ranks 32, 4, 16, 8
    full = greedy_swaps(loads, rank_of, 4, max_swaps=16)
    assert 1 < len(full.swaps) <= 8
    ids = [e for pair in full.swaps for e in pair]
    assert len(ids) == len(set(ids))  # each expert in at most one swap
    sq = [sum(x * x for x in r) for r in full.rank_loads]
    assert all(a > b for a, b in zip(sq, sq[1:]))  # every swap lowers the sum of squares: the loop ends
    bounded = greedy_swaps(loads, rank_of, 4, max_swaps=2)
    assert bounded.swaps == full.swaps[:2]
    assert greedy_swaps(loads, rank_of, 4, max_swaps=0).swaps == ()


def test_greedy_ties_break_by_rank_then_expert_id():
    # ranks 0 and 1 tie as hottest (6 each), ranks 2 and 3 as coldest (2 each): hot = 0, cold = 2
    loads = [3, 3, 3, 3, 1, 1, 1, 1]
    rank_of = [0, 0, 1, 1, 2, 2, 3, 3]
    plan = greedy_swaps(loads, rank_of, 4, max_swaps=1)
    assert plan.swaps == ((0, 4),) and plan.senders == ((0, 2),)
    # same loads, every rank's experts listed in another order: the same plan (ids, not positions, decide)
    again = greedy_swaps(list(loads), list(rank_of), 4, max_swaps=1)
    assert again == plan
    two = greedy_swaps(loads, rank_of, 4, max_swaps=4)
    assert two.swaps == ((0, 4), (2, 6)) and max_over_mean(two.rank_loads[-1]) == 1.0


def test_greedy_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[1, -2\]"):
        greedy_swaps([1, -2], [0, 1], 2, 1)
    with pytest.raises(ValueError, match="max_swaps -1"):
        greedy_swaps([1, 2], [0, 1], 2, -1)


def _plan(loads, rank_of, ep, **kw):
    opts = dict(max_swaps=4, threshold=1.1, layer_seconds=0.01, window=100, bytes_per_expert=10**6, p2p_gbps=50.0)
    return plan_layer(loads, rank_of, ep, **{**opts, **kw})


def test_plan_layer_takes_swaps_that_pay():
    plan = _plan([10, 9, 1, 1, 1, 1, 1, 0], CONTIGUOUS_8x2, 2)
    assert plan.swaps == ((0, 4),) and plan.ratio_before == pytest.approx(1.75) and plan.ratio_after == 1.0
    # saving: 100 steps x 10 ms x (1.75 - 1) / 1.75; cost: one expert per sender, 1 MB at 50 GB/s
    assert plan.saving_s == pytest.approx(100 * 0.01 * 0.75 / 1.75) and plan.cost_s == pytest.approx(2e-5)


def test_plan_layer_threshold_cost_and_ep1():
    loads = [10, 9, 1, 1, 1, 1, 1, 0]
    assert _plan(loads, CONTIGUOUS_8x2, 2, threshold=1.75).swaps == ()  # at the threshold: left alone
    assert _plan(loads, CONTIGUOUS_8x2, 2, threshold=1.7).swaps == ((0, 4),)
    expensive = _plan(loads, CONTIGUOUS_8x2, 2, bytes_per_expert=10**12)  # 20 s to move vs 0.43 s saved
    assert expensive.swaps == () and expensive.ratio_after == expensive.ratio_before == pytest.approx(1.75)
    assert _plan([9, 1, 1, 1], [0, 0, 0, 0], 1).swaps == ()  # one rank: ratio 1.0


def test_plan_layer_keeps_the_prefix_with_the_best_net_saving():
    loads = [8, 8, 8, 8, 1, 1, 1, 1, 4, 4, 4, 4, 2, 2, 2, 2]
    rank_of = [e // 4 for e in range(16)]  # ranks 32, 4, 16, 8; mean 15
    greedy = greedy_swaps(loads, rank_of, 4, max_swaps=4)
    assert greedy.swaps == ((0, 4), (1, 12), (2, 5))
    assert [max(r) for r in greedy.rank_loads] == [32, 25, 19, 18]
    assert greedy.senders == ((0, 1), (0, 3), (0, 1))  # rank 0 sends 1, 2, 3 experts
    # with window x layer time = 1 s the prefixes save 7/32, 13/32 and 14/32 s and cost 1, 2 and 3 experts
    # of rank 0: at 0.2 s per expert the first swap alone nets the most, at 0.1 s the first two
    for per_expert_s, want in ((0.2, 1), (0.1, 2), (0.25, 0)):
        plan = _plan(loads, rank_of, 4, bytes_per_expert=int(per_expert_s * 50e9))
        assert plan.swaps == greedy.swaps[:want], per_expert_s
        if want:
            assert plan.saving_s == pytest.approx([7, 13][want - 1] / 32)
            assert plan.cost_s == pytest.approx(want * per_expert_s)


# --------------------------------------------------------------------------------------------- config
def test_balance_config_defaults_and_errors():
    cfg = parse_piper_config({"piper": {}}).balance
    assert cfg == BalanceConfig() and cfg.migration is False and cfg.window == DEFAULT_WINDOW
    assert cfg.p2p_gbps == DEFAULT_P2P_GBPS and cfg.threshold > 1.0 and cfg.max_moves_per_layer >= 1
    on = parse_piper_config({"piper": {"balance": {"migration": True, "window": 5, "threshold": 1.3}}}).balance
    assert on.migration and on.window == 5 and on.threshold == 1.3
    for block, text in (({"window": 0}, r"balance\.window.*input_value=0"),
                        ({"threshold": 1.0}, r"balance\.threshold.*input_value=1\.0"),
                        ({"threshold": 0.9}, r"balance\.threshold.*input_value=0\.9"),
                        ({"max_moves_per_layer": 0}, r"input_value=0"),
                        ({"p2p_gbps": 0}, r"balance\.p2p_gbps"),
                        ({"moe_time_fraction": 1.5}, r"input_value=1\.5"),
                        ({"windows": 3}, r"balance\.windows")):
        with pytest.raises(ValueError, match="(?s)" + text):
            parse_piper_config({"piper": {"balance": block}})
