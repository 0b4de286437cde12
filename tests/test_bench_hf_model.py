"""The Hugging Face model benchmark (piper_ds.bench.hf_model) on CPU at its tiny size: the three peers train the
same model (the same first and last losses: PiperMoE and AutoEP compute transformers' function) and every record
carries its figures and provenance; its DeepSpeed settings are those of ds_configs/h200_x1.json."""
import json
import os

import pytest

from piper_ds.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_worker(rank, world_size, out):
    from piper_ds.bench import hf_model
    return hf_model.main(["--tiny", "--steps", "3", "--warmup", "1", "--out", out])


def test_tiny_run_trains_the_same_model_three_ways(tmp_path):
    out = str(tmp_path / "hf_model.json")
    records = run_distributed(bench_worker, 1, out, timeout=300)[0]
    assert json.loads(open(out).read()) == records
    assert [r["peer"] for r in records] == ["piper", "autoep", "hf"]
    # the library's default step for the converted model; DeepSpeed's own under deepspeed.initialize
    assert [r["optimizer"] for r in records] == ["FusedStepZeroOptimizer"] + ["DeepSpeedZeroOptimizer"] * 2
    for r in records:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["mfu_pct"] > 0 and r["peak_gb"] > 0, r
        assert r["command"].startswith("python -m piper_ds.bench.hf_model --tiny") and r["commit"] and r["gpu"]
        assert r["first_loss"] == pytest.approx(records[-1]["first_loss"], rel=1e-5), r["peer"]
        assert r["last_loss"] == pytest.approx(records[-1]["last_loss"], rel=1e-4), r["peer"]


def test_deepspeed_settings_are_those_of_the_h200_config():
    from piper_ds.bench.hf_model import ds_config
    with open(os.path.join(ROOT, "ds_configs", "h200_x1.json")) as f:
        shipped = json.load(f)
    ours = ds_config(shipped["train_micro_batch_size_per_gpu"], cuda=True)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "bf16",
                "optimizer", "scheduler", "zero_optimization"):
        assert ours[key] == shipped[key], key


def test_isolated_peers_run_in_their_own_processes_and_a_failure_is_reported(tmp_path, monkeypatch):
    """What a GPU run does: each peer in a fresh process, records gathered; a peer whose process fails leaves a
    record with its error and does not stop the others."""
    from piper_ds.bench import hf_model
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    records = hf_model._run_isolated(["piper", "hf"], ["--tiny", "--steps", "2", "--warmup", "1",
                                                       "--peers", "x", "--out", "ignored.json"], "cmd")
    assert [r["peer"] for r in records] == ["piper", "hf"]
    assert all(r["command"] == "cmd" and r["tokens_per_s"] > 0 for r in records), records
    failed = hf_model._run_isolated(["piper"], ["--tiny", "--steps", "1", "--warmup", "1"], "cmd")  # a ValueError
    assert failed[0]["peer"] == "piper" and "exit status" in failed[0]["error"]
