"""Launcher smoke test: the README's main command, ``deepspeed --num_gpus 2 examples/train.py --deepspeed_config
ds_configs/cpu_tiny.json`` (2 CPU ranks, ep=2, ZeRO-2), trains with a falling loss, writes its metrics JSON and
a checkpoint; ``--resume`` continues from that checkpoint at the right step."""
import json
import os
import subprocess
import sys
import time

from piper_ds.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*extra, config="ds_configs/cpu_tiny.json", timeout=170):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "examples/train.py",
           "--deepspeed_config", config, *extra]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr, time.monotonic() - start


def test_readme_main_command_trains_with_falling_loss_and_resumes(tmp_path):
    metrics, ckpt = tmp_path / "metrics.json", tmp_path / "ckpt"
    out, seconds = _launch("--metrics-out", str(metrics), "--save-dir", str(ckpt))
    m = json.loads(metrics.read_text())
    print(f"main command: {seconds:.0f} s, loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}", file=sys.stderr)
    assert m["steps"] == 100 and m["world_size"] == 2
    assert m["final_loss"] < m["first_loss"] - 1.5, (m["first_loss"], m["final_loss"])
    assert m["final_val_loss"] < m["first_loss"] - 1.5
    for key in ("median_step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu_pct", "peak_memory_gb"):
        assert m[key] > 0, key
    lines = [line for line in out.splitlines() if "MFU" in line and "loss" in line]
    assert len(lines) >= 10, out[-3000:]  # step 1, every steps_per_print (10), the last
    for field in ("aux", "gnorm", "lr", "tok/s", "/gpu", "TFLOP/s/gpu", "mem", "load max/mean", "dropped"):
        assert field in lines[-1], (field, lines[-1])
    assert "validation loss" in out
    assert (ckpt / "latest").read_text().strip() == "global_step100"
    assert len(list((ckpt / "global_step100").glob("layer_*_expert_*_model_states.pt"))) == 2 * 4  # 2 MoE layers

    resumed = tmp_path / "resumed.json"
    _launch("--metrics-out", str(resumed), "--save-dir", str(ckpt), "--resume", "--steps", "105")
    r = json.loads(resumed.read_text())
    assert r["steps"] == 105 and r["history"][0]["step"] == 101
    assert r["first_loss"] < m["first_loss"] - 1.5  # it continued from the trained weights


def test_pipeline_config_trains_with_falling_loss(tmp_path):
    """``ds_configs/cpu_tiny_pipeline.json``: pp = 2 on 2 CPU ranks, the 1F1B pipeline engine, train_batch."""
    metrics, ckpt = tmp_path / "metrics.json", tmp_path / "ckpt"
    out, _ = _launch("--steps", "30", "--metrics-out", str(metrics), "--save-dir", str(ckpt),
                     config="ds_configs/cpu_tiny_pipeline.json", timeout=240)
    m = json.loads(metrics.read_text())
    assert m["steps"] == 30 and m["world_size"] == 2
    assert m["final_loss"] < m["first_loss"] - 1.5, (m["first_loss"], m["final_loss"])
    assert m["final_val_loss"] < m["first_loss"] - 1.5
    lines = [line for line in out.splitlines() if "MFU" in line and "loss" in line]
    for missing in ("aux n/a", "load max/mean n/a", "dropped n/a"):  # reported as at pp = 1
        assert missing not in lines[-1], lines[-1]
    assert "aux 0.0" in lines[-1] and "validation loss" in out
    m_aux = [h["aux_loss"] for h in m["history"] if "aux_loss" in h]
    assert m_aux and all(0 < a < 0.1 for a in m_aux), m_aux
    assert (ckpt / "latest").read_text().strip() == "global_step30"
