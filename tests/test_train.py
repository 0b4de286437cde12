"""Launcher smoke test: the README's main command, ``deepspeed --num_gpus 2 examples/train.py --deepspeed_config
ds_configs/cpu_tiny.json`` (2 CPU ranks, ep=2, ZeRO-2), run from an empty folder, trains with a falling loss,
writes its metrics CSV and a final checkpoint under ``out/cpu_tiny/`` (the README names it) and its metrics
JSON, keeps DeepSpeed's per-rank chatter out of the output; ``--resume`` continues from that checkpoint at the
right step."""
import json
import os
import subprocess
import sys
import time

from piper_ds.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*extra, cwd, config="ds_configs/cpu_tiny.json", timeout=170):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), os.path.join(ROOT, "examples", "train.py"),
           "--deepspeed_config", os.path.join(ROOT, config), *extra]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr, time.monotonic() - start


def test_readme_main_command_trains_with_falling_loss_and_resumes(tmp_path):
    metrics, ckpt, csv = tmp_path / "metrics.json", tmp_path / "out" / "cpu_tiny" / "checkpoints", \
        tmp_path / "out" / "cpu_tiny" / "metrics"
    out, seconds = _launch("--metrics-out", str(metrics), cwd=tmp_path)
    m = json.loads(metrics.read_text())
    print(f"main command: {seconds:.0f} s, loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}", file=sys.stderr)
    assert m["steps"] == 100 and m["world_size"] == 2
    assert m["final_loss"] < m["first_loss"] - 1.5, (m["first_loss"], m["final_loss"])
    assert m["final_val_loss"] < m["first_loss"] - 1.5
    for key in ("median_step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu_pct", "peak_memory_gb"):
        assert m[key] > 0, key
    lines = [line for line in out.splitlines() if "MFU" in line and "loss" in line]
    assert len(lines) >= 10, out[-3000:]  # step 1, every steps_per_print (10), the last
    for field in ("aux", "gnorm", "skipped 0", "lr", "tok/s", "/gpu", "TFLOP/s/gpu", "mem", "load max/mean",
                  "dropped"):
        assert field in lines[-1], (field, lines[-1])
    assert "validation loss" in out
    for chatter in ("built successfully", "No existing process group found", "before it has started"):
        assert chatter not in out, chatter  # DeepSpeed's per-rank lines are quieted
    assert (ckpt / "latest").read_text().strip() == "global_step100"
    assert len(list((ckpt / "global_step100").glob("layer_*_expert_*_model_states.pt"))) == 2 * 4  # 2 MoE layers
    assert (ckpt / "global_step100" / "piper_manifest.json").is_file()
    rows = (csv / "Train_Samples_loss.csv").read_text().strip().splitlines()
    assert rows[0] == "step,loss" and len(rows) >= 11, rows[:3]
    assert (csv / "Train_Samples_skipped_steps.csv").is_file()

    resumed = tmp_path / "resumed.json"
    out, _ = _launch("--metrics-out", str(resumed), "--resume", "--steps", "105", cwd=tmp_path)
    assert f"loaded checkpoint {os.path.join('out', 'cpu_tiny', 'checkpoints', 'global_step100')} (step 100)" in out
    r = json.loads(resumed.read_text())
    assert r["steps"] == 105 and r["history"][0]["step"] == 101
    assert r["first_loss"] < m["first_loss"] - 1.5  # it continued from the trained weights


def test_pipeline_config_trains_with_falling_loss(tmp_path):
    """``ds_configs/cpu_tiny_pipeline.json``: pp = 2 on 2 CPU ranks, the 1F1B pipeline engine, train_batch."""
    metrics, ckpt = tmp_path / "metrics.json", tmp_path / "ckpt"
    out, _ = _launch("--steps", "30", "--metrics-out", str(metrics), "--save-dir", str(ckpt),
                     config="ds_configs/cpu_tiny_pipeline.json", timeout=240, cwd=tmp_path)
    m = json.loads(metrics.read_text())
    assert m["steps"] == 30 and m["world_size"] == 2
    assert m["final_loss"] < m["first_loss"] - 1.5, (m["first_loss"], m["final_loss"])
    assert m["final_val_loss"] < m["first_loss"] - 1.5
    assert "aux n/a" in out and "validation loss" in out  # the pipeline's loss already holds the aux loss
    assert (ckpt / "latest").read_text().strip() == "global_step30"
