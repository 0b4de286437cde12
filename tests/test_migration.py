"""Expert migration is exact: on 4 gloo ranks (fp32, AdamW with a warm-up schedule), runs that swap experts
between EP ranks after steps 1 and 3 end, after 6 steps, with the same losses, the same parameters (gathered by
global expert id) and the same optimizer state (fp32 master, exp_avg, exp_avg_sq, step) as the same runs without
migration: ep = 2 and ep = 4 under ZeRO-0, 1 and 2 (at ep = 2 the expert state is partitioned over the 2
expert-data-parallel ranks under ZeRO-1/2; at ep = 4 each expert has one rank), and pp = 2 x ep = 2 under
ZeRO-1 (each stage swaps in its own layers; its checkpoint after the migrations resumes at pp = 2 x ep = 1 with
the same losses, to 1e-6 relative).

Bit for bit without gradient clipping: a swapped expert computes on the same rows in the same order, each token
sums its two (top-2) expert outputs, a sum of two terms is the same in either order, and Adam is elementwise.
With clipping (ep = 2, ZeRO-2) to 1e-6 relative only: the global gradient norm sums the experts' squares in
partition order, which a swap changes, so the clipping factor may differ in its last bits.

Also: bad moves are ValueErrors naming the experts, a call between backward and step is refused, empty moves
change nothing, and the report counts the experts and bytes moved."""
import pytest
import torch

from piper_ds.testing import run_distributed

WORLD, STEPS = 4, 6
MOVES = {  # after step: moves (layer index -> pairs of global expert ids)
    2: {1: {0: [(0, 2)], 1: [(1, 3), (0, 2)]}, 3: {0: [(2, 3), (1, 0)]}},
    4: {1: {0: [(0, 3), (1, 2)], 1: [(0, 1)]}, 3: {0: [(3, 1)], 1: [(2, 3)]}},
}
#: (ep, ZeRO stage, gradient clipping)
CASES = [(2, 0, 0.0), (2, 1, 0.0), (2, 2, 0.0), (2, 2, 1.0), (4, 0, 0.0), (4, 1, 0.0), (4, 2, 0.0)]


def _run(rank, ep, stage, clip, migrate):
    from expert_runs import engine, train, training_state
    from piper_ds.balance.mover import migrate_experts
    eng, model = engine(WORLD, ep, stage, clip=clip)
    reports = []
    at_step = (lambda step: reports.append(migrate_experts(eng, MOVES[ep].get(step, {})))) if migrate else None
    losses = train(eng, model, 0, STEPS, rank, WORLD, at_step=at_step)
    placements = [layer.placement.as_lists() for layer in eng.piper_moe_layers]
    state = training_state(eng)
    return eng, dict(losses=losses, state=state, placements=placements, reports=reports)


def _errors(rank):
    """Each bad call's exception (type name, message) on this rank."""
    from expert_runs import batch, engine
    from piper_ds.balance.mover import migrate_experts
    eng, model = engine(WORLD, 2, 2)
    out = {}
    bad = {"layer": {5: [(0, 2)]}, "same_rank": {0: [(0, 1)]}, "range": {1: [(0, 9)]}, "twice": {0: [(0, 2), (2, 1)]},
           "pair": {0: [(0, 1, 2)]}, "ranks_disagree": {0: [(0, 2)] if rank else [(1, 3)]}}
    for name, moves in bad.items():
        try:
            migrate_experts(eng, moves)
        except (ValueError, TypeError) as err:
            out[name] = (type(err).__name__, str(err))
    x, y = batch(0, rank, WORLD)
    logits, aux = eng(x)
    eng.backward(model.loss(logits, y) + aux)
    try:
        migrate_experts(eng, {0: [(0, 2)]})
    except RuntimeError as err:
        out["pending"] = (type(err).__name__, str(err))
    eng.step()
    before = [layer.placement.as_lists() for layer in eng.piper_moe_layers]
    report = migrate_experts(eng, {})
    out["empty"] = (report.experts_moved, report.bytes_sent,
                    before == [layer.placement.as_lists() for layer in eng.piper_moe_layers])
    eng.destroy()
    return out


def _worker(rank, world):
    out = {}
    for ep, stage, clip in CASES:
        for migrate in (False, True):
            eng, res = _run(rank, ep, stage, clip, migrate)
            eng.destroy()
            out[(ep, stage, clip, migrate)] = res
    out["errors"] = _errors(rank)
    return out


def _merged(runs, key):
    """The training state of all ranks of one run, by name / global expert id (replicas must agree)."""
    merged = {}
    for res in runs:
        for name, value in res[key]["state"].items():
            if name in merged:
                assert _equal(merged[name], value), f"{key}: ranks disagree on {name}"
            merged[name] = value
    return merged


def _equal(a, b, rtol=0.0):
    (va, ma, mom_a, sa), (vb, mb, mom_b, sb) = a, b
    close = (lambda x, y: torch.equal(x, y)) if rtol == 0 else \
        (lambda x, y: torch.allclose(x, y, rtol=rtol, atol=rtol * float(y.abs().max())))
    return sa == sb and sorted(mom_a) == sorted(mom_b) and close(va, vb) and close(ma, mb) and \
        all(close(mom_a[k], mom_b[k]) for k in mom_a)


# ------------------------------------------------------------------------------------- pp = 2 x ep = 2
PIPE_MOVES = {1: [{0: [(0, 2)]}, {0: [(1, 3)]}], 3: [{0: [(2, 3)]}, {0: [(0, 1)]}]}  # after step: per stage


def _pipe_batch(step, dp_rank, micro):
    g = torch.Generator().manual_seed(100 * step + 10 * dp_rank + micro)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def _pipe_engine(ep):
    from piper_ds.pipeline.engine import initialize_pipeline
    from piper_ds.pipeline.model import PiperPipelineModule
    from piper_ds.system.specs import ModelSpec
    spec = ModelSpec.preset("tiny", n_layers=4, n_dense_layers=1, n_shared_experts=1, seq_len=8, vocab_size=64)
    module = PiperPipelineModule(spec, {"kernels": "reference", "transport": "flat"}, ep_size=ep, num_stages=2,
                                 micro_batch=2, seed=7)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**6,
              "zero_optimization": {"stage": 1}, "gradient_clipping": 0.0, "pipeline": {"use_reentrant": False},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "piper": {"parallel": {"ep_size": ep, "pp_size": 2}, "topology": {"gpus_per_node": 4},
                        "runtime": {"heartbeat": False}}}
    return initialize_pipeline(model=module, config=config)[0]


def _pipe_steps(eng, start, stop):
    return [float(eng.train_batch(iter([_pipe_batch(step, eng.grid.data_parallel_id, m) for m in range(2)])))
            for step in range(start, stop)]


def _pipe_run(rank, migrate, save_dir):
    from expert_runs import training_state
    from piper_ds.balance.mover import migrate_experts
    eng = _pipe_engine(2)
    losses = []
    for step in range(STEPS):
        losses += _pipe_steps(eng, step, step + 1)
        if migrate and step in PIPE_MOVES:
            migrate_experts(eng, PIPE_MOVES[step][eng.stage_id])
    res = dict(losses=losses, state=training_state(eng),
               placements=[layer.placement.as_lists() for layer in eng.piper_moe_layers])
    if migrate:  # the migrated run's checkpoint, resumed at ep = 1 below
        eng.save_checkpoint(save_dir, tag="pipe")
        res["after"] = _pipe_steps(eng, STEPS, STEPS + 4)
    eng.destroy()
    return res


def _pipe_worker(rank, world, save_dir):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    out = {False: _pipe_run(rank, False, save_dir), True: _pipe_run(rank, True, save_dir)}
    eng = _pipe_engine(1)
    eng.load_checkpoint(save_dir, tag="pipe")
    out["resumed_at_ep1"] = _pipe_steps(eng, STEPS, STEPS + 4)
    eng.destroy()
    return out


@pytest.fixture(scope="module")
def pipe_runs(tmp_path_factory):
    return run_distributed(_pipe_worker, WORLD, str(tmp_path_factory.mktemp("pipe")), timeout=400)


def test_pipeline_stages_migrate_their_own_layers_exactly(pipe_runs):
    for rank, res in enumerate(pipe_runs):
        assert res[True]["losses"] == res[False]["losses"], f"rank {rank}"
        assert res[True]["placements"][0] != res[False]["placements"][0], f"rank {rank}: stage did not migrate"
    a, b = _merged(pipe_runs, False), _merged(pipe_runs, True)
    assert set(a) == set(b) and sum("#" in k for k in a) == 3 * 2 * 4  # 3 MoE layers x 2 params x 4 experts
    different = [k for k in a if not _equal(b[k], a[k])]
    assert not different, f"differ after migration: {different[:5]}"


def test_pipeline_checkpoint_after_migration_resumes_at_another_ep_size(pipe_runs):
    for rank, res in enumerate(pipe_runs):
        torch.testing.assert_close(torch.tensor(res["resumed_at_ep1"]), torch.tensor(res[True]["after"]), rtol=1e-6,
                                   atol=0, msg=lambda m: f"rank {rank}: {m}")


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, WORLD, timeout=600)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"ep{c[0]}-zero{c[1]}{'-clip' if c[2] else ''}")
def test_migration_changes_nothing_but_the_placement(runs, case):
    ep, stage, clip = case
    rtol = 1e-6 if clip else 0.0
    plain, moved = (*case, False), (*case, True)
    for rank, res in enumerate(runs):
        if rtol:
            torch.testing.assert_close(torch.tensor(res[moved]["losses"]), torch.tensor(res[plain]["losses"]),
                                       rtol=rtol, atol=0)
        else:
            assert res[moved]["losses"] == res[plain]["losses"], f"rank {rank}"
        assert res[moved]["placements"] != res[plain]["placements"]  # the experts did move
        reports = res[moved]["reports"]
        assert [r.experts_moved for r in reports if r.experts_moved] == \
            [2 * sum(map(len, m.values())) for m in MOVES[ep].values()]
    # every moved expert's slot went once per expert-data-parallel replica: step counts (int64) of w_up and
    # w_down, then their fp32 master weights, exp_avg and exp_avg_sq ([64, 64] and [32, 64] per expert)
    per_expert = 2 * 8 + 3 * 4 * (64 * 64 + 32 * 64)
    for call in range(len(runs[0][moved]["reports"])):
        moved_now = runs[0][moved]["reports"][call].experts_moved
        assert sum(res[moved]["reports"][call].bytes_sent for res in runs) == moved_now * (WORLD // ep) * per_expert
    a, b = _merged(runs, plain), _merged(runs, moved)
    assert set(a) == set(b) and sum("#" in k for k in a) == 2 * 2 * 4  # 2 layers x (w_up, w_down) x 4 experts
    different = [k for k in a if not _equal(b[k], a[k], rtol)]
    assert not different, f"differ after migration: {different[:5]}"


def test_bad_moves_are_refused_naming_them(runs):
    for rank, res in enumerate(runs):
        errors = res["errors"]
        assert errors["layer"][0] == "ValueError" and "MoE layer 5" in errors["layer"][1]
        assert errors["same_rank"] == ("ValueError", "MoE layer 0: experts 0 and 1 both live on EP rank 0; a swap "
                                                     "moves experts between different EP ranks")
        assert errors["range"][0] == "ValueError" and "expert id 9 out of range [0, 4)" in errors["range"][1]
        assert errors["twice"][0] == "ValueError" and "expert 2 appears in more than one swap" in errors["twice"][1]
        assert errors["pair"][0] == "ValueError" and "(0, 1, 2)" in errors["pair"][1]
        assert errors["ranks_disagree"][0] == "ValueError" and "different moves" in errors["ranks_disagree"][1]
        assert errors["pending"][0] == "RuntimeError" and "optimizer-step boundary" in errors["pending"][1]
        assert errors["empty"] == (0, 0, True)


def test_moves_take_integer_like_ids_and_refuse_the_rest():
    """Checked before any communication (no processes needed): NumPy and 0-dim torch ids are taken."""
    from types import SimpleNamespace

    import numpy as np

    from piper_ds.balance.mover import _validated
    from piper_ds.moe import PiperMoE
    layer = PiperMoE(8, 4, 8, ep_size=2, kernels="reference")
    engine = SimpleNamespace(piper_moe_layers=[layer])
    assert _validated(engine, {np.int64(0): [(np.int64(0), torch.tensor(3))], }) == {0: [(0, 3)]}
    assert _validated(engine, {0: []}) == {}
    with pytest.raises(ValueError, match="names MoE layer 0 twice"):
        _validated(engine, {0: [], torch.tensor(0): []})
    with pytest.raises(ValueError, match=r"a move must be a pair \(a, b\) of global expert ids, got \(True, 2\)"):
        _validated(engine, {0: [(True, 2)]})
    with pytest.raises(ValueError, match="moves names MoE layer 1, but the engine has 1 MoE layers"):
        _validated(engine, {1: [(0, 2)]})
    with pytest.raises(TypeError, match="moves must map a layer index"):
        _validated(engine, [(0, 2)])
