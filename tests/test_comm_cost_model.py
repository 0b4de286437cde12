"""Tier 1: α-β fits per tier and the flat vs hierarchical all-to-all model (the planner's hook)."""
import math

import pytest

from piper_ds.comm.cost_model import AlphaBeta, alltoall_time, fit_alpha_beta, fit_tiers


def test_fit_recovers_alpha_beta():
    true = AlphaBeta(5e-6, 1 / 25e9)
    sizes = [2**k for k in range(10, 31, 2)]
    fit = fit_alpha_beta([(n, true.time(n) * (1 + 0.01 * (-1)**i)) for i, n in enumerate(sizes)])
    assert math.isclose(fit.alpha_s, 5e-6, rel_tol=0.05)
    assert math.isclose(fit.bandwidth_GBps, 25, rel_tol=0.05)
    tiers = fit_tiers({"intra": [(n, AlphaBeta(2e-6, 1 / 300e9).time(n)) for n in sizes],
                       "inter": [(n, true.time(n)) for n in sizes]})
    assert tiers["intra"].bandwidth_GBps > tiers["inter"].bandwidth_GBps
    assert set(tiers["inter"].to_dict()) >= {"alpha_us", "bandwidth_GBps"}


def test_fit_keeps_parameters_non_negative():
    # time falls slightly with size at the small end: alpha stays >= 0 and beta >= 0
    fit = fit_alpha_beta([(0, 1e-6), (1e6, 0.9e-6), (2e6, 1.1e-6)])
    assert fit.alpha_s >= 0 and fit.beta_s_per_byte >= 0
    with pytest.raises(ValueError, match="two or more sizes"):
        fit_alpha_beta([(10, 1.0), (10, 2.0)])
    with pytest.raises(ValueError, match="times > 0"):
        fit_alpha_beta([(10, 0.0), (20, 1.0)])


def test_alltoall_model():
    intra, inter = AlphaBeta(3e-6, 1 / 400e9), AlphaBeta(10e-6, 1 / 50e9)
    # one node: both transports are the same Phase I
    assert alltoall_time("flat", 2**26, 1, 8, intra, inter) == alltoall_time("hierarchical", 2**26, 1, 8, intra,
                                                                              inter)
    # many nodes, small messages: fewer inter-node messages win
    small = [alltoall_time(k, 2**20, 256, 8, intra, inter) for k in ("flat", "hierarchical")]
    assert small[1] < small[0] / 3
    # two nodes, large messages: bandwidth bound, the extra intra-node hop costs a little
    big = [alltoall_time(k, 2**30, 2, 8, intra, inter) for k in ("flat", "hierarchical")]
    assert big[0] <= big[1] <= 1.3 * big[0]
    assert alltoall_time("hierarchical", 2**20, 4, 8, intra, inter, planned=True) < \
        alltoall_time("hierarchical", 2**20, 4, 8, intra, inter)
    with pytest.raises(ValueError, match="kind must be"):
        alltoall_time("ring", 1, 1, 1, intra, inter)
