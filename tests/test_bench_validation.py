"""Predicted vs measured (piper_ds.bench.validation): the data is the run's, the fit is one constant, the
table prints."""
import json
import math
import os

import pytest

from piper_ds.bench import validation as V
from piper_ds.planner.profile import PlatformProfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_and_layout_are_those_of_the_config():
    with open(os.path.join(ROOT, "ds_configs", "h200_x2.json")) as f:
        cfg = json.load(f)
    assert cfg["piper"]["model"] == V.H200_X2_MODEL_BLOCK
    lay = V.H200_X2_LAYOUT
    assert cfg["piper"]["parallel"]["ep_size"] == lay.ep
    assert cfg["train_micro_batch_size_per_gpu"] == lay.micro_batch
    assert cfg.get("gradient_accumulation_steps", 1) == lay.grad_accum
    assert cfg["zero_optimization"]["stage"] == lay.zero_stage
    assert cfg["bf16"]["enabled"] and lay.precision == "bf16"
    assert lay.gpus == 2
    fused = V.RUN_OPTIMIZER["fused AdamW"]
    assert cfg["optimizer"]["type"] == fused["type"]
    assert {k: cfg["optimizer"]["params"][k] for k in fused["params"]} == fused["params"]
    assert V.run_layout("fused AdamW").fused_optimizer and not V.run_layout("unfused AdamW").fused_optimizer
    # measured on 2026-11-28 with DeepSpeed's own ZeRO step: the planner predicts that step for them
    assert not any(V.run_layout(run).fused_step for run in V.MEASURED_STEP)


def test_every_measurement_has_provenance_and_a_row():
    for key in ("step", "moe_layer", "alltoall"):
        assert {"date", "gpu", "config", "command"} <= set(V.PROVENANCE[key])
    rows = V.compare()
    assert len(rows) == 2 + 1 + 2 + 4 + len(V.MEASURED_LAYER_S) + len(V.MEASURED_A2A_FLAT_S)
    for r in rows:
        assert math.isfinite(r.rel_err) and r.predicted > 0 and r.measured > 0, r


def test_flop_accounting_reproduces_the_measured_tflops():
    row = next(r for r in V.compare() if r.case == "FLOP accounting check")
    assert abs(row.rel_err) < 1e-3  # 182.9 TFLOP/s at 22,920 tokens/s per GPU


def test_calibrated_overhead_fits_the_single_gpu_layers():
    prof = V.calibrated_profile()
    base = PlatformProfile()
    assert prof.moe_layer_overhead_us > base.moe_layer_overhead_us  # the defaults stay as they were
    pred = [V.moe_layer_seconds(s, 1, prof)["total"] for s in ("a", "b")]
    meas = [V.MEASURED_LAYER_S[(s, 1)] for s in ("a", "b")]
    assert sum(pred) == pytest.approx(sum(meas), rel=1e-9)  # least squares of one constant: mean residual 0
    for p, m in zip(pred, meas):
        assert abs(p - m) / m < 0.15
    assert 3000 < prof.moe_layer_overhead_us < 3600  # 3.3 ms per MoE layer fwd+bwd with kernels=reference


def test_layer_parts_exclude_attention():
    parts = V.moe_layer_seconds("b", 1)
    assert parts["a2a"] == 0.0  # ep 1: no all-to-all
    assert parts["router"] < 0.01 * parts["experts"]
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert V.moe_layer_seconds("a", 2)["a2a"] > 0


def test_h200_x2_peak_is_the_backward_phase_for_both_optimizers():
    # the two runs measured the same peak; the model puts both in backward, where the optimizer plays no part
    rows = [r for r in V.compare() if r.quantity == "peak memory w/o fragmentation"]
    assert len(rows) == 2 and rows[0].predicted == pytest.approx(rows[1].predicted)
    for run in V.MEASURED_STEP:
        ph = {k: sum(v.values()) for k, v in V.phase_breakdown(run).items()}
        assert ph["backward"] > ph["step"]


def test_unfused_optimizer_costs_more():
    row = next(r for r in V.compare() if r.quantity == "optimizer, unfused - fused")
    assert row.predicted > 0 and row.measured == pytest.approx(49.7, abs=0.1)
    fused, unfused = (V.step_breakdown(run=r)["optimizer"] for r in ("fused AdamW", "unfused AdamW"))
    assert unfused / fused == pytest.approx((26 + 80) / (26 + 28))


def test_cli_prints_the_table(capsys):
    assert V.main(["--calibrated"]) == 0
    out = capsys.readouterr().out
    assert "step time" in out and "peak memory" in out and "moe_layer_overhead_us" in out
