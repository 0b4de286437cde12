"""CPU smoke run of the expert-migration benchmark on 4 gloo ranks (--tiny: 6 steps, window 2): both runs route
the same tokens, migration swaps experts after the first window and lowers the EP-rank load after it; the
JSON record, the plot and the table. Until piper_ds.balance.mover lands, the placement-only fake of
tests/fake_mover.py stands in for it (the loads measured here depend on the placement only)."""
import importlib.util
import json

import fake_mover
from piper_ds.testing import run_distributed

ARGV = ["--tiny", "--micro-batch", "2"]


def _worker(rank, world):
    if importlib.util.find_spec("piper_ds.balance.mover") is None:
        fake_mover.install()
    from piper_ds.bench.migration import parse_args, run
    return run(parse_args(ARGV))


def test_bench_migration_tiny_cpu(tmp_path, capsys):
    from piper_ds.bench import migration
    results = run_distributed(_worker, 4, timeout=300)
    def agreed(result):  # all but each rank's own wall time
        return {name: {k: v for k, v in run.items() if k != "seconds"} for name, run in result["runs"].items()}
    assert all(agreed(r) == agreed(results[0]) for r in results)  # every rank the same figures
    static, moving = results[0]["runs"]["static"], results[0]["runs"]["migration"]
    assert len(static["ratio_per_step"]) == len(moving["ratio_per_step"]) == 6
    assert static["ratio_per_step"][:2] == moving["ratio_per_step"][:2]  # same routing, same placement so far
    assert static["moves"] == 0 and static["bytes_moved"] == 0 and moving["moves"] >= 1
    assert moving["bytes_moved"] > 0 and [w["step"] for w in moving["windows"]] == [2, 4, 6]
    assert moving["windows"][0]["moves"] >= 1
    assert sum(moving["ratio_per_step"][2:]) < sum(static["ratio_per_step"][2:])  # lower load after the move
    assert results[0]["closer_to_1"] > 0
    args = migration.parse_args(ARGV + ["--out", str(tmp_path / "m.json")])
    rec = migration.record(args, results[0], 4, ARGV)
    assert rec["command"] == "python -m piper_ds.bench.migration --tiny --micro-batch 2" and rec["commit"]
    assert rec["model"]["num_experts"] == 16 and rec["ep"] == 4 and rec["model"]["top_k"] == 4
    json.dumps(rec)
    assert migration.plot(rec, str(tmp_path / "m.png")) and (tmp_path / "m.png").stat().st_size > 5000
    lines = migration.table(rec).splitlines()
    assert lines[1].startswith("static") and lines[2].startswith("migration") and "closer to 1.0" in lines[-1]
