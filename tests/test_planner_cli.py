"""`python -m piper_ds.plan` and `python -m piper_ds.bench.calibrate` end to end (CPU)."""
import json
import os
import subprocess
import sys

import pytest

from piper_ds import plan
from piper_ds.bench import calibrate
from piper_ds.planner.profile import PlatformProfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_issue_command_writes_a_config_deepspeed_accepts(tmp_path):
    out = tmp_path / "plan.json"
    # the issue's command; the DeepSpeed parse runs in this process (test_cli_runs_deepspeed_check runs the
    # CLI's own check) to spare a second DeepSpeed import
    cmd = [sys.executable, "-m", "piper_ds.plan", "--model", "xmoe-small", "--cluster", "h200-nvlink-ib400",
           "--gpus", "4", "--global-batch", "512", "--seq", "2048", "--out", str(out), "--no-ds-check"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"deepspeed --num_gpus 4 examples/train.py --deepspeed_config {out}" in proc.stdout
    assert "Top 10 of" in proc.stdout and "Memory per stage" in proc.stdout
    cfg = json.loads(out.read_text())
    lay = cfg["piper_plan"]["layout"]
    ds = plan.check_with_deepspeed(cfg, lay["dp"])  # DeepSpeed's own parser, as on rank 0 of the job
    assert ds.train_batch_size == 512 and ds.zero_optimization_stage == lay["zero_stage"]
    assert ds._param_dict["piper"]["parallel"] == {"ep_size": lay["ep"], "pp_size": lay["pp"]}
    assert cfg["piper"]["topology"] == {"gpus_per_node": 4}  # 4 GPUs of an 8-GPU node: the job's own node
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # torch's AdamW: nothing to JIT-build
    from piper_ds.config import parse_piper_config  # the project's own validation of the "piper" block
    piper = parse_piper_config(cfg)
    assert piper.model.name == "xmoe-small" and piper.model.seq_len == 2048
    assert piper.moe_for_model().top_k == 6
    # the planner predicts the engines' fused ZeRO step, and the config leaves it on
    assert lay["fused_step"] is True and piper.optimizer.fused_step == "auto"


def test_config_names_the_zero_step_the_layout_predicts():
    from piper_ds.config import parse_piper_config
    from piper_ds.planner.dsconfig import build_ds_config
    from piper_ds.system.layout import Layout
    from piper_ds.system.specs import ModelSpec
    spec = ModelSpec.preset("tiny")
    for fused_step, mode in ((True, "auto"), (False, "off")):
        cfg = build_ds_config(spec, Layout(dp=2, ep=2, zero_stage=2, fused_step=fused_step))
        assert cfg["piper"]["optimizer"] == {"fused_step": mode}
        assert parse_piper_config(cfg).optimizer.fused_step == mode
        assert cfg["piper_plan"]["layout"]["fused_step"] is fused_step


def test_cli_runs_deepspeed_check(tmp_path, capsys, monkeypatch):
    calls = []
    real = plan.check_with_deepspeed
    monkeypatch.setattr(plan, "check_with_deepspeed", lambda cfg, dp: calls.append(dp) or real(cfg, dp))
    out = tmp_path / "tiny.json"
    assert plan.main(["--model", "tiny", "--gpus", "2", "--global-batch", "8", "--out", str(out)]) == 0
    assert len(calls) == 1 and out.exists()


def test_nothing_fits_exits_nonzero_naming_memory(tmp_path, capsys):
    out = tmp_path / "x.json"
    rc = plan.main(["--model", "deepseek-v3", "--gpus", "8", "--global-batch", "64", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == plan.EXIT_NOTHING_FITS and not out.exists()
    assert "binding constraint 'memory'" in err and "over by" in err and "GiB" in err


@pytest.mark.parametrize("extra,text", [
    (["--zero", "3"], "ZeRO-3 is rejected"),
    (["--pp", "2", "--zero", "2"], "PipelineEngine allows ZeRO 0/1 only"),
])
def test_nothing_fits_structural(tmp_path, capsys, extra, text):
    rc = plan.main(["--model", "tiny", "--gpus", "4", "--global-batch", "8", "--out", str(tmp_path / "x.json")]
                   + extra)
    assert rc == plan.EXIT_NOTHING_FITS
    assert text in " ".join(capsys.readouterr().err.split())


def test_bad_input_exit_2(tmp_path, capsys):
    assert plan.main(["--model", "nope", "--gpus", "4", "--global-batch", "8",
                      "--out", str(tmp_path / "x.json")]) == plan.EXIT_BAD_INPUT
    assert "unknown model preset 'nope'" in capsys.readouterr().err


def test_model_json_plots_and_multinode_command(tmp_path, capsys):
    spec = tmp_path / "model.json"
    spec.write_text(json.dumps({"preset": "xmoe-small", "n_layers": 8}))
    out = tmp_path / "cfg" / "plan_multi.json"
    rc = plan.main(["--model", str(spec), "--gpus", "16", "--global-batch", "64", "--out", str(out),
                    "--plot", "--no-ds-check", "--top", "3", "--max-micro-batch", "2"])
    stdout = capsys.readouterr().out
    assert rc == 0
    for png in ("memory_per_stage.png", "step_breakdown.png"):
        assert (out.parent / png).stat().st_size > 1000
    assert f"deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 examples/train.py --deepspeed_config {out}" \
        in " ".join(stdout.split())
    assert json.loads(out.read_text())["piper"]["model"]["n_layers"] == 8


def test_calibrate_tiny_profile_feeds_the_planner(tmp_path, capsys):
    prof_path = tmp_path / "profile.json"
    assert calibrate.main(["--cpu", "--out", str(prof_path)]) == 0
    prof = PlatformProfile.load(str(prof_path))
    assert prof.dense_tflops > 0 and prof.attention_tflops > 0 and prof.hbm_tbps > 0
    assert len(prof.grouped_gemm) == 3 and prof.measurements["tiny"] is True
    out = tmp_path / "tiny.json"
    rc = plan.main(["--model", "tiny", "--gpus", "2", "--global-batch", "8", "--profile", str(prof_path),
                    "--precision", "fp32", "--out", str(out), "--no-ds-check"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads(out.read_text())
    assert cfg["bf16"]["enabled"] is False and cfg["piper_plan"]["predicted"]["tokens_per_s"] > 0


def test_fit_tier_from_points():
    tier = calibrate.fit_tier([(1e6, 1e-4 + 1e6 / 50e9), (1e8, 1e-4 + 1e8 / 50e9)])
    assert tier.bw_gbps == pytest.approx(50) and tier.latency_us == pytest.approx(100)
    noisy = calibrate.fit_tier([(1e3, 5e-4), (1e6, 1e-4)])
    assert noisy.bw_gbps == pytest.approx(1e6 / 1e-4 / 1e9) and noisy.latency_us == pytest.approx(100)
    assert calibrate.fit_tier([]) is None


def test_plan_reports_expert_migration_cost(tmp_path, capsys):
    from piper_ds.planner.cluster import ClusterSpec
    from piper_ds.planner.migration import migration_cost
    from piper_ds.planner.resources import moe_block_seconds
    from piper_ds.system.layout import Layout
    from piper_ds.system.specs import ModelSpec
    spec, cluster, prof = ModelSpec.preset("xmoe-small"), ClusterSpec.preset("h200-nvlink-ib400"), PlatformProfile()
    lay = Layout(dp=4, ep=4, zero_stage=1, micro_batch=4, grad_accum=32)
    cost = migration_cost(spec, cluster, lay, prof, window=100)
    assert cost.table_iv_bytes == 92_274_688  # Table IV: 16 bytes per parameter of a 2048 x 1408 GELU expert
    # after a step: fp32 master + two moments, 12 B (the weights are cast from the master on arrival)
    assert cost.sent_bytes == 12 * spec.expert_params() and cost.link == "intra_node"
    assert cost.swap_seconds == pytest.approx(45e-6 + 1e-6 + cost.sent_bytes / 335e9)
    balanced = moe_block_seconds(spec, cluster, lay, prof) / prof.load_imbalance
    assert cost.layer_seconds == pytest.approx(balanced)
    assert cost.break_even == pytest.approx(1 + cost.swap_seconds / (100 * balanced))
    sharded = migration_cost(spec, cluster, Layout(dp=8, ep=4, zero_stage=1, micro_batch=4, grad_accum=16), prof)
    assert sharded.sent_bytes == cost.sent_bytes  # ZeRO shards are gathered first: every replica sends it all
    assert migration_cost(spec, cluster, Layout(dp=4, ep=1), prof) is None
    rc = plan.main(["--model", "xmoe-small", "--gpus", "4", "--ep", "4", "--global-batch", "512", "--seq", "2048",
                    "--out", str(tmp_path / "x.json"), "--no-ds-check", "--top", "2"])
    text = " ".join(capsys.readouterr().out.split())
    assert rc == 0 and "Expert migration per MoE layer (28 layers; piper.balance window 100 steps)" in text
    assert "88.0 MiB" in text and "intra_node 335 GB/s" in text and "break-even max/mean" in text
    rc = plan.main(["--model", "tiny", "--gpus", "2", "--ep", "1", "--global-batch", "8",
                    "--out", str(tmp_path / "y.json"), "--no-ds-check"])
    assert rc == 0 and "expert migration: none possible at ep = 1" in capsys.readouterr().out
