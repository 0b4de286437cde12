"""Block-overhead calibration: the fit rules, the prediction it subtracts (the resource model's own block
time), and ``python -m piper_ds.bench.calibrate`` on CPU writing the measured overheads into a valid profile."""
import json

import pytest

from piper_ds.bench import calibrate
from piper_ds.planner import ClusterSpec, PlatformProfile, estimate
from piper_ds.system.layout import Layout
from piper_ds.system.specs import ModelSpec
from piper_ds.planner.overheads import (apply_fits, block_layout, block_prediction, block_rows, fit_overhead,
                                        without_overheads)
from piper_ds.planner.resources import _block_time

H200 = ClusterSpec.preset("h200-nvlink-ib400")
REF = ModelSpec.preset("xmoe-small-swiglu", n_layers=14, n_shared_experts=2)


def test_fit_recovers_a_fixed_plus_per_row_line():
    pts = [(r, 1.5e-3 + 50e-9 * r) for r in (12288, 24576, 49152)]
    fit = fit_overhead(pts)
    assert fit.fixed_us == pytest.approx(1500) and fit.per_row_ns == pytest.approx(50)
    assert fit.warnings == [] and fit.seconds(49152) == pytest.approx(pts[-1][1])


def test_fit_fixed_only_is_the_mean():
    fit = fit_overhead([(1, 1e-3), (2, 3e-3)], per_row=False)
    assert fit.fixed_us == pytest.approx(2000) and fit.per_row_ns == 0 and fit.warnings == []


def test_fit_negative_slope_falls_back_to_the_mean_with_a_warning():
    fit = fit_overhead([(1000, 3e-3), (2000, 2e-3), (4000, 1e-3)])
    assert fit.per_row_ns == 0 and fit.fixed_us == pytest.approx(2000)
    assert fit.raw_per_row_ns < 0 and "slope" in fit.warnings[0]


def test_fit_negative_intercept_goes_through_the_origin():
    fit = fit_overhead([(1000, 0.5e-3), (2000, 2e-3), (4000, 5e-3)])
    assert fit.fixed_us == 0 and fit.per_row_ns > 0 and fit.raw_fixed_us < 0
    assert "origin" in fit.warnings[0]


def test_fit_negative_residuals_are_recorded_and_set_to_zero():
    fit = fit_overhead([(1, -2e-3), (2, -1e-3)], per_row=False, label="dense block")
    assert fit.fixed_us == 0 and fit.raw_fixed_us == pytest.approx(-1500)
    assert fit.warnings and fit.warnings[0].startswith("dense block: residual -1500.0 us < 0")
    with pytest.raises(ValueError, match="at least one"):
        fit_overhead([])


@pytest.mark.parametrize("moe", [True, False])
def test_prediction_plus_fitted_overhead_is_the_models_block_time(moe):
    """The calibration subtracts exactly what the model later adds back: block time with the fitted
    overheads = overhead-free prediction + the fitted overhead term."""
    base = PlatformProfile()
    prof = apply_fits(base, fit_overhead([(12288, 2e-3), (49152, 4e-3)]), fit_overhead([(1, 1e-4)], per_row=False))
    for mb in (1, 4):
        pred = block_prediction(REF, H200, base, mb, moe)
        full = _block_time(REF, H200, block_layout(mb, "bf16"), prof, moe)
        want = prof.moe_overhead_seconds(block_rows(REF, mb)) if moe else prof.dense_layer_overhead_us * 1e-6
        assert full["overhead"] == pytest.approx(want)
        assert sum(full[p] for p in ("dense", "attention", "experts", "elementwise", "a2a")) \
            == pytest.approx(pred["total"])
        assert pred["overhead"] == 0


def test_per_row_overhead_reaches_the_step_prediction():
    lay = Layout(dp=2, ep=2, zero_stage=2, micro_batch=4)
    base = without_overheads(PlatformProfile())
    per_row = base.model_copy(update={"moe_overhead_ns_per_row": 100.0})
    rows = 4 * REF.seq_len * REF.top_k * PlatformProfile().load_imbalance  # busiest EP rank
    extra = estimate(REF, H200, lay, per_row).step_time - estimate(REF, H200, lay, base).step_time
    assert extra == pytest.approx(REF.n_moe_layers * rows * 100e-9)


def test_checkpointing_repeats_the_forward_share_of_the_overhead():
    prof = PlatformProfile()
    plain = _block_time(REF, H200, Layout(dp=1, micro_batch=1), prof, True)["overhead"]
    ckpt = _block_time(REF, H200, Layout(dp=1, micro_batch=1, activation_checkpointing=True), prof, True)
    assert ckpt["overhead"] == pytest.approx(plain * 4 / 3)


def test_calibrate_cpu_records_and_applies_block_overheads(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert calibrate.main(["--cpu", "--out", str(out), "--kernels", "reference"]) == 0
    prof = PlatformProfile.load(str(out))
    rec = prof.measurements["block_overhead"]
    assert rec["kernels"] == "reference" and rec["precision"] == "fp32" and "kernels=reference" in prof.source
    fits = {}
    for kind in ("moe", "dense"):
        points = rec[kind]["points"]
        assert [p["micro_batch"] for p in points] == [1, 2, 4]
        for p in points:
            assert p["measured_s"] > 0 and p["predicted_no_overhead_s"] > 0 and len(p["times_s"]) == 2
            assert p["residual_s"] == pytest.approx(p["measured_s"] - p["predicted_no_overhead_s"])
        fits[kind] = rec[kind]["fit"]
        assert [x for x, _ in fits[kind]["points"]] == [p["rows"] for p in points]
    assert prof.moe_layer_overhead_us == pytest.approx(fits["moe"]["fixed_us"])
    assert prof.moe_overhead_ns_per_row == pytest.approx(fits["moe"]["per_row_ns"])
    assert prof.dense_layer_overhead_us == pytest.approx(fits["dense"]["fixed_us"])
    assert fits["dense"]["per_row_ns"] == 0
    stdout = capsys.readouterr().out
    assert "block overheads: MoE" in stdout
    for w in rec["warnings"]:  # a clamped value is never silent
        assert f"WARNING: {w}" in stdout
    json.dumps(prof.model_dump(mode="json"))


def test_calibrate_warns_and_zeroes_a_negative_overhead(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(calibrate, "time_block", lambda *a, **k: [1e-9, 1e-9])  # faster than any prediction
    out = tmp_path / "profile.json"
    assert calibrate.main(["--cpu", "--out", str(out), "--kernels", "reference"]) == 0
    prof = PlatformProfile.load(str(out))
    assert prof.moe_layer_overhead_us == 0 and prof.moe_overhead_ns_per_row == 0
    assert prof.dense_layer_overhead_us == 0
    rec = prof.measurements["block_overhead"]
    assert rec["moe"]["fit"]["raw_fixed_us"] < 0 and rec["dense"]["fit"]["raw_fixed_us"] < 0
    stdout = capsys.readouterr().out
    assert "WARNING: moe block:" in stdout and "WARNING: dense block: residual" in stdout


def test_model_spec_from_a_ds_config(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"piper": {"model": {"preset": "xmoe-small-swiglu", "n_layers": 14}}}))
    spec = calibrate.model_spec(str(cfg), 2)
    assert spec.n_layers == 14 and spec.n_shared_experts == 2 and spec.d_model == 2048
    assert calibrate.model_spec("tiny").n_shared_experts == 0
    with pytest.raises(ValueError, match="no such ds_config"):
        calibrate.model_spec(str(tmp_path / "missing.json"))
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="no piper.model block"):
        calibrate.model_spec(str(tmp_path / "empty.json"))
