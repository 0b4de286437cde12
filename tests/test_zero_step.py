"""The ZeRO optimizer-step micro-benchmark (:mod:`piper_ds.bench.zero_step`): its harness on CPU, bad input."""
import pytest
import torch

from piper_ds.bench.zero_step import bench_zero_step


def test_zero_step_runs_a_deepspeed_step_on_cpu():
    # CPU: fp32, the harness only (the child process, DeepSpeed's engine, the timing), not a planner figure
    out = bench_zero_step(torch.device("cpu"), numel=3 * 4096 + 5, tensor_numel=4096, warmup=1, iters=2,
                          timeout_s=240)
    assert out["numel"] == 3 * 4096  # rounded down to whole tensors
    assert len(out["times_s"]) == 2 and out["seconds"] > 0
    assert out["ns_per_param"] == pytest.approx(out["seconds"] / out["numel"] * 1e9)


@pytest.mark.parametrize("kwargs", [{"numel": 0}, {"iters": 0}, {"tensor_numel": 0}, {"warmup": -1}])
def test_zero_step_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="bench_zero_step needs"):
        bench_zero_step(torch.device("cpu"), **kwargs)


def test_zero_step_rejects_other_devices():
    with pytest.raises(ValueError, match="runs on CUDA"):
        bench_zero_step(torch.device("meta"))


def test_calibrate_keeps_the_measured_step_or_warns(monkeypatch, capsys):
    from piper_ds.bench import calibrate, zero_step
    from piper_ds.planner.profile import PlatformProfile
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 << 30, 141 << 30))
    seen = {}

    def fake(device, numel, step):
        seen["numel"], seen["step"] = numel, step
        return {"ns_per_param": 0.031, "numel": numel, "seconds": 0.031 * numel * 1e-9, "times_s": [0.03],
                "step": step}

    monkeypatch.setattr(zero_step, "bench_zero_step", fake)
    prof = calibrate._calibrate_optimizer(PlatformProfile(), torch.device("cuda", 0))
    assert prof.optimizer_ns_per_param == 0.031 and prof.measurements["zero_step"]["numel"] == seen["numel"]
    # the calibration times the engines' fused step and says so, so the planner uses the figure for it
    assert seen["step"] == "fused" and prof.optimizer_step == "fused"
    assert seen["numel"] == (32 << 30) // calibrate.ZERO_STEP_BYTES_PER_PARAM  # half the free memory

    def broken(device, numel, step):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(zero_step, "bench_zero_step", broken)
    prof = calibrate._calibrate_optimizer(PlatformProfile(), torch.device("cuda", 0))
    assert prof.optimizer_ns_per_param is None and "out of memory" in prof.measurements["zero_step"]["error"]
    assert "WARNING: ZeRO step benchmark failed (CUDA out of memory)" in capsys.readouterr().out


def test_zero_step_cli_times_both_steps_on_cpu(tmp_path, capsys):
    import json

    from piper_ds.bench.zero_step import main
    out = tmp_path / "zero_step.json"
    records = main(["--numel", str(3 * 4096), "--tensor-numel", "4096", "--iters", "1", "--warmup", "0",
                    "--out", str(out)])
    assert [r["step"] for r in records] == ["fused", "deepspeed"] and [r["peer"] for r in records] == ["piper",
                                                                                                      "deepspeed"]
    assert json.loads(out.read_text()) == records
    for r in records:
        assert r["numel"] == 3 * 4096 and r["ms"] > 0 and r["command"].startswith("python -m piper_ds.bench")
    assert "fused" in capsys.readouterr().out


def test_zero_step_rejects_unknown_steps():
    from piper_ds.bench.zero_step import main
    with pytest.raises(ValueError, match="step must be one of"):
        bench_zero_step(torch.device("cpu"), step="apex")
    with pytest.raises(ValueError, match="unknown steps"):
        main(["--steps", "fused,apex"])
