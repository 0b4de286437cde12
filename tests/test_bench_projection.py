"""All-to-all projection (piper_ds.bench.projection): runs, writes its files, and the curves behave."""
import csv
import os

import pytest

from piper_ds.bench import projection as P
from piper_ds.comm.cost_model import alltoall_time


def test_intra_fit_reproduces_the_large_measurements():
    from piper_ds.bench.validation import MEASURED_A2A_FLAT_S
    intra = P.intra_fit()
    for nbytes, secs in MEASURED_A2A_FLAT_S.items():
        pred = alltoall_time("flat", nbytes, 1, 2, intra, intra)
        assert abs(pred - secs) / secs < 0.22, (nbytes, pred, secs)
    assert 300 < intra.bandwidth_GBps < 400


def test_curves_are_monotone_and_bounded():
    rows = P.project(P.dispatch_bytes_per_rank())
    assert P.dispatch_bytes_per_rank() == 192 * 2 ** 20
    for key in ("flat_ms", "hier_ms", "hier_planned_ms", "nic_bound_ms", "flat_ms_a2us", "flat_ms_a20us",
                "hier_planned_ms_a2us", "hier_planned_ms_a20us"):
        vals = [r[key] for r in rows]
        assert vals == sorted(vals), key  # fixed bytes per rank: more nodes never help
    for r in rows:
        assert r["hier_planned_ms"] < r["hier_ms"]  # the lane round costs (L-1) intra latencies
        assert r["nic_bound_ms"] <= min(r["flat_ms"], r["hier_planned_ms"])
        assert r["flat_ms_a2us"] <= r["flat_ms"] <= r["flat_ms_a20us"]
    ratio = [r["flat_over_hier_planned"] for r in rows]
    assert ratio == sorted(ratio) and ratio[0] < 1 < ratio[-1]  # flat wins small, hierarchical wins large


def test_cli_writes_csv_and_png(tmp_path, capsys):
    assert P.main(["--out", str(tmp_path)]) == 0
    with open(tmp_path / "alltoall_projection.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["nodes"]) for r in rows] == list(P.NODES)
    assert os.path.getsize(tmp_path / "alltoall_projection.png") > 1000
    assert "model prediction" in capsys.readouterr().out


def test_errors_name_values():
    with pytest.raises(ValueError, match=r"nic_gbps \(0"):
        P.inter_tier(5.0, 0)
    with pytest.raises(ValueError, match=r"top_k \(0\)"):
        P.dispatch_bytes_per_rank(top_k=0)
