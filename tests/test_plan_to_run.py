"""Plan -> run: ``python -m piper_ds.plan`` for a tiny model on 1 and 2 ranks, then ``examples/train.py`` trains
5 steps from the written ds_config as it is, on CPU ranks (gloo) started by the deepspeed launcher."""
import json
import os
import subprocess

import pytest

from piper_ds import plan
from piper_ds.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_written_config_trains(tmp_path, capsys, gpus):
    cfg_path, metrics = tmp_path / "plan.json", tmp_path / "metrics.json"
    assert plan.main(["--model", "tiny", "--gpus", str(gpus), "--global-batch", str(4 * gpus), "--precision",
                      "fp32", "--out", str(cfg_path), "--no-ds-check"]) == 0
    launch = capsys.readouterr().out.split("launch:")[-1].split()
    assert launch[:3] == ["deepspeed", "--num_gpus", str(gpus)], launch
    cfg = json.loads(cfg_path.read_text())
    assert cfg["piper"]["topology"]["gpus_per_node"] == gpus  # never more than the job has
    assert cfg["optimizer"]["params"]["torch_adam"] is True and cfg["optimizer"]["params"]["fused"] is True
    cmd = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(free_port()), "examples/train.py",
           "--deepspeed_config", str(cfg_path), "--steps", "5", "--data", "random", "--metrics-out", str(metrics)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    m = json.loads(metrics.read_text())
    assert m["steps"] == 5 and m["world_size"] == gpus and m["final_loss"] > 0
