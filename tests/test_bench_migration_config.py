"""The expert-migration benchmark with a ds_config (--config), with natural routing, and its summary arithmetic:
two CPU runs end to end (4 gloo ranks, --tiny: 6 steps, window 2) through the command line, JSON record and
plot, and the summary figures against their definitions."""
import json
import math
import statistics

import pytest

from piper_ds.bench import migration

CPU_TINY = "ds_configs/cpu_tiny.json"


@pytest.fixture
def config(tmp_path):
    """ds_configs/cpu_tiny.json (ZeRO-2, ep 2, 4 experts, top-2, seq 64, micro-batch 8, one dense layer) without
    its CSV monitor and checkpoint folder, reading 1 MiB of the built-in corpus."""
    with open(CPU_TINY) as f:
        cfg = json.load(f)
    cfg.pop("csv_monitor")
    cfg["piper"].pop("checkpoint")
    cfg["piper"]["data"] = {"max_bytes": 2**20}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _check_consistent(rec):
    """The summary figures follow from the per-step series as documented."""
    warmup, window = rec["warmup"], rec["window"]
    per_step = rec["tokens_per_step"]
    for name, run in rec["runs"].items():
        assert run["peer"] == name and run["routing"] == rec["routing"] and run["ep"] == rec["ep"]
        assert run["command"] == rec["command"] and run["commit"] and run["device"] == "cpu"
        steps = rec["steps"]
        assert len(run["step_s"]) == len(run["optimizer_s"]) == len(run["loss"]) == len(run["tokens_per_s"]) == steps
        assert len(run["moe_s_per_rank"]) == rec["world"] and all(len(r) == steps for r in run["moe_s_per_rank"])
        assert all(math.isfinite(x) and x > 0 for x in run["loss"])
        for i, s in enumerate(run["step_s"]):  # the MoE forward and engine.step() are parts of the step
            assert 0 < run["optimizer_s"][i] < s and all(0 < r[i] < s for r in run["moe_s_per_rank"])
            assert run["tokens_per_s"][i] == pytest.approx(per_step / s, rel=1e-12)
        s = run["summary"]
        assert s["median_step_s"] == statistics.median(run["step_s"][warmup:])
        assert s["tokens_per_s"] == pytest.approx(per_step / s["median_step_s"], rel=1e-12)
        timed = run["step_s"][warmup:]
        assert s["run_tokens_per_s"] == pytest.approx(per_step * len(timed) / sum(timed), rel=1e-12)
        assert s["median_moe_s_per_rank"] == [statistics.median(r[warmup:]) for r in run["moe_s_per_rank"]]
        assert [w["train_step"] for w in run["windows"]] == [window, 2 * window, 3 * window]
        plain = [o for i, o in enumerate(run["optimizer_s"]) if i >= warmup and (i + 1) % window]
        for w in run["windows"]:
            assert w["step_excess_s"] == run["optimizer_s"][w["train_step"] - 1] - statistics.median(plain)
            assert w["overhead"] == pytest.approx(w["step_excess_s"] / (window * s["median_step_s"]), rel=1e-12)
    static, moving, sm = rec["runs"]["static"], rec["runs"]["migration"], rec["summary"]
    assert sm["speedup"] == static["summary"]["median_step_s"] / moving["summary"]["median_step_s"]
    assert sm["tokens_per_s_ratio"] == pytest.approx(
        moving["summary"]["run_tokens_per_s"] / static["summary"]["run_tokens_per_s"], rel=1e-12)
    diffs = [abs(a - b) for a, b in zip(static["loss"], moving["loss"])]
    assert sm["max_abs_loss_diff"] == max(diffs)
    first = sm["first_migration_step"]
    assert first == next((w["train_step"] for w in moving["windows"] if w["moves"]), None)
    first = first or rec["steps"]
    # same tokens, same routing, same placement until the first migration: equal losses, bit for bit on CPU
    assert diffs[:first] == [0.0] * first and sm["losses_identical_before_migration"]
    assert sm["migrations"] == sum(1 for w in moving["windows"] if w["moves"])
    assert sm["migration_s"] == sum(w["migration_s"] for w in moving["windows"])
    assert static["moves"] == 0 and moving["moves"] == sum(w["moves"] for w in moving["windows"])


def test_config_natural_routing(config, tmp_path, capsys):
    out = tmp_path / "natural.json"
    argv = ["--config", config, "--routing", "natural", "--layers", "2", "--tiny", "--out", str(out)]
    migration.main(argv)
    rec = json.loads(out.read_text())
    assert rec["command"] == "python -m piper_ds.bench.migration " + " ".join(argv)
    assert rec["routing"] == "natural" and rec["data"].startswith("built-in") and rec["backend"] == "gloo"
    assert rec["ep"] == 2 and rec["world"] == 4 and rec["ds_config"]["zero_optimization"]["stage"] == 2
    assert rec["model_spec"]["n_layers"] == 2 and rec["model_spec"]["n_dense_layers"] == 1  # --layers, dense kept
    assert rec["model"]["n_shared_experts"] == 1 and rec["micro_batch"] == 8
    assert rec["tokens_per_step"] == 4 * 8 * 64  # ranks x micro-batch x sequence length
    assert all(len(r) == 1 for r in rec["runs"]["static"]["ratio_per_layer_step"])  # one MoE layer
    assert rec["runs"]["static"]["loss"][0] == pytest.approx(math.log(256), rel=0.1)  # bytes, untrained
    _check_consistent(rec)
    targets = rec["summary"]["targets"]
    assert targets["tokens_per_s_ratio"]["met"] is None and rec["target_met"] is None  # skew targets only
    assert targets["loss_rel_diff"]["met"] is (rec["summary"]["max_rel_loss_diff"] <= migration.LOSS_RTOL)
    assert rec["link"] is None and all(w["predicted_link_s"] is None for w in rec["runs"]["migration"]["windows"])
    assert (tmp_path / "natural.png").stat().st_size > 5000
    printed = capsys.readouterr().out.splitlines()
    assert printed[-6].startswith("medians after 3 warm-up steps") and "under skew: n/a" in printed[-1]


def test_config_skewed_with_link_prediction(config, tmp_path):
    from piper_ds.system.migration import expert_migration_bytes
    from piper_ds.system.specs import ModelSpec
    out = tmp_path / "skewed.json"
    migration.main(["--config", config, "--ep", "4", "--experts", "8", "--tiny", "--out", str(out),
                    "--profile", "ds_configs/profiles/h200_x4.json"])
    rec = json.loads(out.read_text())
    assert rec["routing"] == "skewed" and rec["ep"] == 4 and rec["model_spec"]["num_experts"] == 8
    _check_consistent(rec)
    sm = rec["summary"]  # the seeded skew (random tokens) makes the first window swap experts
    assert sm["first_migration_step"] == 2 and sm["migrations"] >= 1 and sm["migration_s"] > 0
    assert sm["max_overhead"] is not None and sm["predicted_link_s"] > 0
    with open("ds_configs/profiles/h200_x4.json") as f:
        tier = json.load(f)["p2p_tiers"]["intra_node"]
    assert rec["link"] == {"cluster": migration.DEFAULT_CLUSTER, "profile": "ds_configs/profiles/h200_x4.json",
                           "link": "intra_node", "bw_gbps": tier["bw_gbps"], "latency_us": tier["latency_us"]}
    spec = ModelSpec.from_block(rec["model"])
    per_expert = expert_migration_bytes(spec.expert_params(), weight_bytes=4, master_copy=True, with_grads=False,
                                        weights_from_master=True)  # fp32 under ZeRO-2: master + 2 moments
    for w in rec["runs"]["migration"]["windows"]:
        assert sum(m["swaps"] for m in w["layers"]) == w["moves"]
        assert all(m["bytes_per_expert"] == per_expert and m["max_sent_experts"] >= 1 for m in w["layers"])
        sent = [m["max_sent_experts"] * m["bytes_per_expert"] for m in w["layers"]]
        assert w["predicted_s"] == pytest.approx(sum(sent) / 50e9, rel=1e-9)  # piper.balance.p2p_gbps default
        assert w["predicted_link_s"] == pytest.approx(
            sum(tier["latency_us"] * 1e-6 + b / (tier["bw_gbps"] * 1e9) for b in sent), rel=1e-9)
    assert rec["summary"]["targets"]["tokens_per_s_ratio"]["met"] in (True, False)
    assert rec["target_met"] in (True, False)


def _run(step_s, optimizer_s, loss, windows, tokens_per_step=100):
    return {"step_s": step_s, "optimizer_s": optimizer_s, "loss": loss, "windows": windows,
            "tokens_per_step": tokens_per_step, "moe_s_per_rank": [[0.1] * len(step_s), [0.2] * len(step_s)]}


def test_summary_arithmetic():
    static = _run([9.0, 2.0, 2.0, 2.0, 2.0, 2.0], [1.0] * 6, [3.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                  [{"train_step": 2, "moves": 0, "migration_s": 0.0, "predicted_s": 0.0},
                   {"train_step": 4, "moves": 0, "migration_s": 0.0, "predicted_s": 0.0}])
    moving = _run([9.0, 1.5, 1.0, 1.0, 1.0, 1.0], [1.0, 1.5, 0.5, 0.5, 0.5, 0.5], [3.0, 2.0, 2.0, 2.5, 2.0, 2.0],
                  [{"train_step": 2, "moves": 3, "migration_s": 0.4, "predicted_s": 0.1, "predicted_link_s": 0.05},
                   {"train_step": 4, "moves": 0, "migration_s": 0.0, "predicted_s": 0.0, "predicted_link_s": None}])
    static["summary"] = migration.summarize_run(static, warmup=1, window=2)
    moving["summary"] = migration.summarize_run(moving, warmup=1, window=2)
    assert static["summary"]["median_step_s"] == 2.0 and moving["summary"]["median_step_s"] == 1.0
    assert moving["summary"]["tokens_per_s"] == 100.0 and moving["summary"]["run_tokens_per_s"] == 500 / 5.5
    assert moving["summary"]["median_optimizer_s"] == 0.5  # steps 3, 5, 6: no window ends there
    assert moving["summary"]["median_moe_s_per_rank"] == [0.1, 0.2]
    assert moving["windows"][0]["step_excess_s"] == 1.0 and moving["windows"][0]["overhead"] == 0.5
    assert moving["windows"][1]["step_excess_s"] == 0.0
    out = migration.compare(static, moving, window=2, skewed=True)
    assert out["speedup"] == 2.0 and out["tokens_per_s_ratio"] == (500 / 5.5) / (500 / 10.0)
    assert out["migrations"] == 1 and out["migration_s"] == 0.4 and out["predicted_s"] == 0.1
    assert out["predicted_link_s"] == 0.05 and out["max_overhead"] == 0.5 and out["max_mover_overhead"] == 0.2
    assert out["max_abs_loss_diff"] == 0.5 and out["max_rel_loss_diff"] == 0.25
    assert out["first_migration_step"] == 2 and out["losses_identical_before_migration"]
    assert out["max_rel_loss_diff_before_migration"] == 0.0
    t = out["targets"]
    assert t["migration_overhead"] == {"value": 0.5, "op": "<=", "bound": 0.05, "met": False}
    assert t["tokens_per_s_ratio"]["met"] is True and t["loss_rel_diff"]["met"] is False
    assert migration.compare(static, moving, window=2, skewed=False)["targets"]["tokens_per_s_ratio"]["met"] is None


def test_bad_arguments_name_the_values(tmp_path):
    with pytest.raises(ValueError, match="--data.*natural"):
        migration.parse_args(["--data", "x.txt"])
    with pytest.raises(ValueError, match="random tokens"):
        migration.parse_args(["--routing", "natural", "--data", "random"])
    with pytest.raises(ValueError, match=r"--warmup \(6\)"):
        migration.parse_args(["--tiny", "--warmup", "6"])
    with pytest.raises(ValueError, match=r"--experts \(10\) divisible by --ep \(4\)"):
        migration.parse_args(["--experts", "10"])
    no_model = tmp_path / "no_model.json"
    no_model.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "piper": {"parallel": {"ep_size": 2}}}))
    with pytest.raises(ValueError, match="no_model.json.*piper.*model"):
        migration.bench_config(migration.parse_args(["--config", str(no_model)]), migration=False)
    with pytest.raises(ValueError, match="ep_size is 1"):
        migration.bench_config(migration.parse_args(["--config", CPU_TINY, "--ep", "1"]), migration=True)
    cfg = migration.bench_config(migration.parse_args(["--config", CPU_TINY, "--layers", "14", "--micro-batch", "2"]),
                                 migration=True)
    assert cfg["piper"]["model"]["n_layers"] == 14 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["piper"]["balance"] == {"migration": True, "window": migration.DEFAULT_WINDOW}
    assert cfg["zero_optimization"] == {"stage": 2} and cfg["piper"]["parallel"]["ep_size"] == 2  # the config's
