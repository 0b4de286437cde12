"""Fault injection on 2 CPU ranks (gloo) through ``examples/train.py``, each rank its own process
(``piper_ds.testing.launch_ranks``) so that each one's exit code and output are seen. Faults come from
``PIPER_FAULT`` (piper_ds.runtime.faults): a rank SIGKILLed after writing a chosen checkpoint file, a rank
SIGSTOPped after a chosen step. The cases and what each proves are listed in docs/fault_tolerance.md."""
import json
import os
import re
import shutil

import pytest

from piper_ds.testing import launch_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train.py")


def _config(folder, name="ds_config.json", ep_size=2, lr=None, zero_stage=2, **runtime):
    """ds_configs/cpu_tiny.json with a metrics line every step, a short process-group timeout and ``runtime``."""
    with open(os.path.join(ROOT, "ds_configs", "cpu_tiny.json")) as f:
        cfg = json.load(f)
    cfg["steps_per_print"] = 1
    cfg["zero_optimization"]["stage"] = zero_stage
    cfg["piper"]["parallel"]["ep_size"] = ep_size
    cfg["piper"]["runtime"] = {"timeout_s": 30, **runtime}
    if lr is not None:
        cfg["optimizer"]["params"]["lr"] = lr
        cfg["scheduler"]["params"].update(warmup_min_lr=lr, warmup_max_lr=lr)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _train(config, *args, fault=None, grace=10.0, timeout=240):
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if fault:
        env["PIPER_FAULT"] = fault
    return launch_ranks([TRAIN, "--deepspeed_config", config, "--data", "random", "--val-interval", "0", *args], 2,
                        timeout, env=env, grace=grace)


def _losses(metrics_path):
    with open(metrics_path) as f:
        return {h["step"]: (h["loss"], h["aux_loss"]) for h in json.load(f)["history"] if "loss" in h}


def _show(runs):
    return "\n".join(f"--- rank {r.rank} (exit {r.returncode}) ---\n{r.output[-3000:]}" for r in runs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """8 steps with checkpoints at 3 and 6 (and the final one at 8), ep 2."""
    folder = str(tmp_path_factory.mktemp("uninterrupted"))
    config, save_dir, metrics = _config(folder), os.path.join(folder, "ckpt"), os.path.join(folder, "m.json")
    runs = _train(config, "--steps", "8", "--save-interval", "3", "--save-dir", save_dir, "--metrics-out", metrics)
    assert [r.returncode for r in runs] == [0, 0], _show(runs)
    return dict(config=config, save_dir=save_dir, losses=_losses(metrics))


@pytest.mark.parametrize("killed, file", [(0, "mp_rank_00_model_states.pt"),
                                          (1, "layer_0_expert_2_mp_rank_00_model_states.pt")])
def test_rank_killed_during_a_save_resumes_bit_identical(uninterrupted, tmp_path, killed, file):
    config, save_dir, metrics = uninterrupted["config"], str(tmp_path / "ckpt"), str(tmp_path / "m.json")
    runs = _train(config, "--steps", "8", "--save-interval", "3", "--save-dir", save_dir,
                  fault=f"KILL@{killed}:save:global_step6/{file}")
    assert runs[killed].returncode == -9 and runs[1 - killed].returncode != 0, _show(runs)
    with open(os.path.join(save_dir, "latest")) as f:
        assert f.read() == "global_step3"  # never the torn global_step6
    assert not os.path.exists(os.path.join(save_dir, "global_step6"))

    runs = _train(config, "--steps", "8", "--save-interval", "3", "--save-dir", save_dir, "--resume",
                  "--metrics-out", metrics)
    assert [r.returncode for r in runs] == [0, 0], _show(runs)
    assert f"loaded checkpoint {os.path.join(save_dir, 'global_step3')} (step 3)" in runs[0].output
    resumed, straight = _losses(metrics), uninterrupted["losses"]
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    assert {step: straight[step] for step in resumed} == resumed  # bit-identical (loss, aux loss)


def test_resume_under_another_expert_parallel_size_continues_the_run(uninterrupted, tmp_path):
    save_dir, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.json")
    shutil.copytree(uninterrupted["save_dir"], save_dir)  # the resumed run saves too: keep the fixture's folder
    runs = _train(_config(str(tmp_path), ep_size=1), "--steps", "8", "--save-dir", save_dir, "--resume",
                  "global_step3", "--metrics-out", metrics)
    assert [r.returncode for r in runs] == [0, 0], _show(runs)
    assert (f"loaded checkpoint {os.path.join(save_dir, 'global_step3')} (step 3, saved under [world 2, dp 2, ep 2, "
            "pp 1, ZeRO-2, 4 experts], optimizer state from piper_state/)") in runs[0].output
    resumed, straight = _losses(metrics), uninterrupted["losses"]
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    # the same tokens per rank (so the same aux loss); gradient norms and ZeRO partitions sum in another order
    for step, (loss, aux) in resumed.items():
        assert loss == pytest.approx(straight[step][0], rel=1e-5) and aux == pytest.approx(straight[step][1], rel=1e-5)


def test_resume_under_another_zero_stage_is_refused(uninterrupted, tmp_path):
    config = _config(str(tmp_path), zero_stage=1)
    runs = _train(config, "--steps", "9", "--save-dir", uninterrupted["save_dir"], "--resume")
    assert [r.returncode for r in runs] == [1, 1], _show(runs)
    saved = "world 2, dp 2, ep 2, pp 1, ZeRO-2, 4 experts"
    now = "world 2, dp 2, ep 2, pp 1, ZeRO-1, 4 experts"
    full = [r for r in runs if "Traceback" in r.output]
    assert len(full) == 1, _show(runs)  # one traceback, from the rank that failed first
    assert f"saved under layout [{saved}], this run has [{now}]: resuming under another pipeline size or ZeRO " \
           "stage is refused" in full[0].output
    other = runs[1 - full[0].rank].output.strip().splitlines()[-1]
    assert other.startswith(f"[piper_ds] [rank {1 - full[0].rank}] ValueError: checkpoint "), other
    assert other.endswith(f"(rank {full[0].rank} reported the same error first; see its traceback)"), other


def test_a_stopped_rank_makes_the_other_exit_naming_it(tmp_path):
    timeout_s = 5
    runs = _train(_config(str(tmp_path), timeout_s=timeout_s), "--steps", "20", fault="STOP@1:step:3", grace=2)
    stopped_at = float(re.search(r"SIGSTOP to rank 1 at step:3 \(time ([0-9.]+)\)", runs[1].output).group(1))
    assert runs[0].returncode == 4, _show(runs)
    assert "rank 1 stopped answering: no heartbeat for" in runs[0].output
    waited = runs[0].ended_at - stopped_at
    assert waited < timeout_s + 10, f"rank 0 exited {waited:.1f} s after rank 1 stopped (timeout {timeout_s} s)"


def test_divergence_stops_after_skipped_steps_and_keeps_the_last_checkpoint(tmp_path):
    folder = str(tmp_path)
    config = _config(folder, lr=1e4, max_skipped_steps=3)
    with open(config) as f:
        cfg = json.load(f)
    cfg["csv_monitor"] = {"enabled": True, "output_path": os.path.join(folder, "csv"), "job_name": "run"}
    with open(config, "w") as f:
        json.dump(cfg, f)
    save_dir, metrics = os.path.join(folder, "ckpt"), os.path.join(folder, "m.json")
    runs = _train(config, "--steps", "30", "--save-interval", "2", "--save-dir", save_dir, "--metrics-out", metrics)
    assert [r.returncode for r in runs] == [3, 3], _show(runs)
    assert "training diverged: the last 3 optimizer steps" in runs[0].output
    with open(metrics) as f:
        summary = json.load(f)
    assert summary["stopped"] == "diverged" and summary["skipped_steps"] == 3
    stop = summary["steps"]
    assert stop < 30 and "skipped 2" in runs[0].output  # the count is on the metrics line
    with open(os.path.join(folder, "csv", "run", "Train_Samples_skipped_steps.csv")) as f:
        assert f.read().strip().splitlines()[-1].endswith(",2.0")  # and in the CSV (last line before the stop)
    with open(os.path.join(folder, "csv", "run", "Train_Samples_grad_norm.csv")) as f:
        assert f.read().strip().splitlines()[-1].endswith(",inf")  # a non-finite norm is recorded, not dropped
    last = max(step for step in range(2, stop, 2))
    with open(os.path.join(save_dir, "latest")) as f:
        assert f.read() == f"global_step{last}"  # no checkpoint written at the stop
    assert sorted(n for n in os.listdir(save_dir) if n.startswith("global_step"))[-1] == f"global_step{last}"
    assert os.path.isfile(os.path.join(save_dir, f"global_step{last}", "piper_manifest.json"))
