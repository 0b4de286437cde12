"""CPU smoke run of the pipeline benchmark on 4 gloo ranks: both layouts, all schedules (DualPipeV on pp=2 only),
timeline PNGs,
JSON with measurements beside planner predictions, metrics in range."""
import json
import os

from piper_ds.testing import run_distributed


def bench_worker(rank, world_size, out):
    from piper_ds.bench.pipeline import parse_args, run
    args = parse_args(["--tiny", "--out", out, "--micro-batch", "2", "--grad-accum", "4", "--warmup", "1",
                       "--steps", "1", "--schedules", "1f1b,overlap,dualpipev"])
    return run(args)


def test_bench_pipeline_tiny_cpu(tmp_path, capfd):
    out = str(tmp_path / "bench.json")
    results = run_distributed(bench_worker, 4, out, timeout=300)[0]
    assert [(r["pp"], r["ep"], r["schedule"]) for r in results] == [
        (2, 2, "1f1b"), (2, 2, "overlap"), (2, 2, "dualpipev"), (1, 4, "1f1b"), (1, 4, "overlap")]
    data = json.load(open(out))
    assert len(data["results"]) == 5
    printed = capfd.readouterr().out
    assert "dualpipev: skipped, DualPipeV needs pp >= 2" in printed
    for r in results:
        assert os.path.getsize(r["timeline_png"]) > 5000
        assert 0.0 <= r["bubble_fraction"] < 1.0 and r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert 0.0 <= r["a2a_hidden_share"] <= 1.0 and r["a2a_seconds_per_rank"] > 0
        assert r["predicted"]["step_s"] > 0
        if r["schedule"] in ("1f1b", "dualpipev"):
            assert r["a2a_hidden_share"] == 0.0  # nothing runs beside the all-to-all on CPU without halves
    pp2 = [r for r in results if r["pp"] == 2]
    assert pp2[0]["loss"] == pp2[0]["loss"]  # finite
    assert pp2[0]["bubble_fraction"] > [r for r in results if r["pp"] == 1][0]["bubble_fraction"] - 0.5
