"""The ZeRO optimizer-step micro-benchmark (:mod:`piper_ds.zero_step`): its harness on CPU, bad input."""
import pytest
import torch

from piper_ds.zero_step import bench_zero_step


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
