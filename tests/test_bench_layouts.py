"""``python -m piper_ds.bench.layouts``: candidate choice and verdicts (pure), and a tiny 2-rank gloo run
that trains every candidate layout in the same processes and reports the top-choice verdict."""
import json

import pytest

from piper_ds.bench import layouts as L
from piper_ds.planner import ClusterSpec, PlatformProfile
from piper_ds.system.specs import ModelSpec
from piper_ds.testing import run_distributed

H200 = ClusterSpec.preset("h200-nvlink-ib400")


def test_auto_n_layers_fits_one_and_two_h200():
    base = ModelSpec.preset("xmoe-small-swiglu", n_shared_experts=2)
    prof = PlatformProfile()
    assert L.auto_n_layers(base, H200, 2, prof, 0.8) == 14  # the reference model of ds_configs/h200_x2.json
    one = L.auto_n_layers(base, H200, 1, prof, 0.8)
    assert 7 <= one < 14  # ds_configs/h200_x1.json runs 7
    with pytest.raises(ValueError, match="exceed"):
        L.auto_n_layers(base, H200, 1, prof, 0.05)


def test_candidates_top_then_deliberately_different():
    args = L.parse_args(["--global-batch", "8"])
    spec = ModelSpec.preset("xmoe-small-swiglu", n_shared_experts=2, n_layers=14)
    cands = L.candidates(spec, H200, 2, 8, PlatformProfile(), args)
    roles = [r for r, _ in cands]
    assert roles[:4] == ["top 1", "top 2", "top 3", "top 4"] and len(cands) == 6
    assert roles[4] == "predicted slowest"
    steps = [e.step_time for _, e in cands[:4]]
    assert steps == sorted(steps)
    assert cands[4][1].step_time >= max(steps)
    lays = [e.layout for _, e in cands]
    assert len({lay.short() for lay in lays}) == 6
    assert all(lay.zero_stage in (1, 2) and lay.pp == 1 and lay.global_batch == 8 for lay in lays)
    assert all(e.worst.total <= 0.8 * H200.hbm_bytes for _, e in cands)


def test_explicit_layouts_and_errors():
    lays = L.parse_layouts("ep2.z2.mb4, ep1.z1.mb2.ckpt", 2, 8, "bf16")
    assert [(x.ep, x.zero_stage, x.micro_batch, x.grad_accum, x.activation_checkpointing) for x in lays] == [
        (2, 2, 4, 1, False), (1, 1, 2, 2, True)]
    with pytest.raises(ValueError, match="unknown part 'pp2'"):
        L.parse_layouts("ep2.pp2", 2, 8, "bf16")
    with pytest.raises(ValueError, match=r"global batch \(8\) must be divisible by GPUs x micro-batch \(2 x 3\)"):
        L.parse_layouts("mb3", 2, 8, "bf16")
    with pytest.raises(ValueError, match="--steps"):
        L.parse_args(["--steps", "0"])
    with pytest.raises(ValueError, match=r"--zero-stages \('1,3'\)"):
        L.parse_args(["--zero-stages", "1,3"])


def test_verdicts_and_top_choice():
    def res(name, step, pred, peak=None, pred_peak=10.0):
        return L.add_errors({"layout": name, "role": "given", "step_s": step, "peak_gb": peak,
                             "predicted": {"step_s": pred, "peak_wo_fragmentation_gb": pred_peak}})
    a, b, c = res("a", 1.0, 0.8, 10.5), res("b", 0.9, 0.85), res("c", 2.0, 1.0)
    assert a["rel_err"]["step"] == pytest.approx(-0.2) and a["within"]["step_25pct"] is True
    assert a["within"]["step_10pct"] is False and a["within"]["peak_10pct"] is True
    assert b["rel_err"]["peak"] is None and b["within"]["peak_25pct"] is None
    v = L.top_choice([a, b, c])
    assert v["predicted_top"] == "a" and v["fastest_measured"] == "b" and v["top_is_fastest"] is False
    assert v["gap"] == pytest.approx(1.0 / 0.9 - 1) and v["spearman"] == pytest.approx(0.5)
    text = L.table([a, b, c], v)
    assert "is NOT the fastest measured" in text and "-20.0%" in text
    assert v["tied"] == [] and "predicted equal" not in text
    # a layout predicted equal to the top choice (ZeRO-1 and ZeRO-2 over one rank) is named, the verdict stays
    d = res("d", 0.85, 0.8 * (1 + L.TIE / 2))
    v = L.top_choice([a, b, c, d])
    assert v["tied"] == ["d"] and v["top_is_fastest"] is False and v["fastest_measured"] == "d"
    assert "predicted equal to the top choice: d" in L.table([a, b, c, d], v)


def _bench_worker(rank, world_size, out, profile):
    return L.run(L.parse_args(["--tiny", "--out", out, "--profile", profile, "--top", "1", "--extra", "1",
                               "--global-batch", "4", "--warmup", "1", "--steps", "2"]))


def test_bench_layouts_tiny_two_gloo_ranks(tmp_path):
    profile = tmp_path / "profile.json"
    PlatformProfile(source="test", moe_layer_overhead_us=100.0, moe_overhead_ns_per_row=5.0).save(str(profile))
    out = tmp_path / "layouts.json"
    reports = run_distributed(_bench_worker, 2, str(out), str(profile), timeout=120)
    rep = reports[0]
    assert [r["role"] for r in rep["results"]] == ["top 1", "predicted slowest"]
    assert reports[1]["top_choice"] == rep["top_choice"]  # every rank holds the same report
    for r in rep["results"]:
        assert r["step_s"] > 0 and len(r["step_times_s"]) == 2 and r["predicted"]["step_s"] > 0
        assert r["rel_err"]["step"] is not None and r["peak_gb"] is None  # no CUDA memory on CPU
        assert set(r["within"]) == {"step_25pct", "step_10pct", "peak_25pct", "peak_10pct"}
    assert any(r["config"]["ep"] == 2 for r in rep["results"])  # EP over both ranks ran too
    assert any(r["config"]["activation_checkpointing"] for r in rep["results"])
    v = rep["top_choice"]
    assert v["predicted_top"] == rep["results"][0]["layout"]
    assert v["fastest_measured"] in {r["layout"] for r in rep["results"]}
    assert isinstance(v["top_is_fastest"], bool)
    data = json.loads(out.read_text())
    assert data["profile_source"] == "test" and len(data["results"]) == 2 and data["gpus"] == 2


def _only_worker(rank, world_size, out, profile, index):
    if index >= 2:
        try:
            L.run(L.parse_args(["--tiny", "--out", out, "--top", "1", "--extra", "1", "--global-batch", "4",
                                "--only", str(index)]))
        except ValueError as err:
            return str(err)
        return None
    return L.run(L.parse_args(["--tiny", "--out", out, "--profile", profile, "--top", "1", "--extra", "1",
                               "--global-batch", "4", "--warmup", "0", "--steps", "1", "--only", str(index)]))


def test_only_runs_one_candidate_and_merge_gives_the_verdict(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    PlatformProfile(source="test").save(str(profile))
    outs = [tmp_path / f"lay{i}.json" for i in (1, 0)]  # merged back in candidate order
    for out, index in zip(outs, (1, 0)):
        rep = run_distributed(_only_worker, 2, str(out), str(profile), index, timeout=120)[0]
        assert len(rep["results"]) == 1 and rep["results"][0]["layout"] == rep["candidates"][index][1]
    merged = L.merge([str(p) for p in outs], str(tmp_path / "merged.json"))
    assert [r["layout"] for r in merged["results"]] == [layout for _, layout in merged["candidates"]]
    assert merged["top_choice"]["predicted_top"] in {r["layout"] for r in merged["results"]}
    assert "predicted top choice" in capsys.readouterr().out
    errors = run_distributed(_only_worker, 2, str(tmp_path / "x.json"), str(profile), 5, timeout=120)
    assert all(e is not None and "--only 5: there are 2 candidates" in e for e in errors), errors


def test_rescore_sets_stored_measurements_against_the_current_planner(tmp_path, capsys):
    from piper_ds.planner.resources import estimate
    from piper_ds.system.layout import Layout
    spec = ModelSpec.preset("xmoe-small-swiglu", n_layers=14, n_dense_layers=1)
    lay = Layout(dp=4, ep=1, zero_stage=2, micro_batch=1, grad_accum=4, activation_checkpointing=True)
    old = {"step_s": 0.5, "peak_gb": 40.0, "peak_wo_fragmentation_gb": 40.0}
    measured = {"layout": lay.short(), "role": "top 1", "config": lay.model_dump(mode="json"), "step_s": 1.0,
                "peak_gb": 50.0, "predicted": old}
    report = {"model": spec.to_block(), "cluster": H200.name, "profile": None, "gpus": 4,
              "candidates": [["top 1", lay.short()]], "results": [L.add_errors(measured)]}
    path, out = tmp_path / "stored.json", tmp_path / "rescored.json"
    path.write_text(json.dumps(report))
    got = L.rescore(str(path), str(out))
    r = got["results"][0]
    est = estimate(spec, H200, lay, PlatformProfile())
    assert r["predicted"]["step_s"] == pytest.approx(est.step_time)
    assert r["predicted"]["peak_gb"] == pytest.approx(est.worst.total / 1e9)
    assert r["predicted_before"] == old and r["rel_err_before"]["peak"] == pytest.approx(-0.2)
    assert r["rel_err"]["step"] == pytest.approx(est.step_time - 1.0)
    assert json.loads(out.read_text())["rescored_from"] == str(path)
    assert "peak -20.0% ->" in capsys.readouterr().out
    # rescoring a rescored report keeps the first prediction as the "before"
    again = L.rescore(str(out), str(tmp_path / "again.json"))
    assert again["results"][0]["predicted_before"] == old
    report["profile"] = str(tmp_path / "gone.json")
    path.write_text(json.dumps(report))
    with pytest.raises(ValueError, match="gone.json"):
        L.rescore(str(path), str(out))


def test_rescore_predicts_deepspeeds_step_for_layouts_stored_before_fused_step(tmp_path):
    from piper_ds.planner.resources import estimate
    from piper_ds.system.layout import Layout
    spec = ModelSpec.preset("xmoe-small-swiglu", n_layers=4, n_dense_layers=1)
    lay = Layout(dp=4, ep=4, zero_stage=2, micro_batch=4)
    old_config = {k: v for k, v in lay.model_dump(mode="json").items() if k != "fused_step"}
    results = [{"layout": lay.short(), "role": role, "config": config, "step_s": 1.0, "peak_gb": 50.0,
                "predicted": {"step_s": 0.5, "peak_gb": 40.0, "peak_wo_fragmentation_gb": 40.0}}
               for role, config in (("top 1", old_config), ("top 2", lay.model_dump(mode="json")))]
    report = {"model": spec.to_block(), "cluster": H200.name, "profile": None, "gpus": 4,
              "candidates": [[r["role"], lay.short()] for r in results], "results": [L.add_errors(r) for r in results]}
    path = tmp_path / "stored.json"
    path.write_text(json.dumps(report))
    old, new = L.rescore(str(path), str(tmp_path / "rescored.json"))["results"]
    for r, fused_step in ((old, False), (new, True)):
        est = estimate(spec, H200, lay.model_copy(update={"fused_step": fused_step}), PlatformProfile())
        assert r["predicted"]["step_s"] == pytest.approx(est.step_time)
    assert old["predicted"]["step_s"] > new["predicted"]["step_s"]  # DeepSpeed's step moves more bytes
