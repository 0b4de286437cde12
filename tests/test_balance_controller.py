"""The balance controller: the window tally of the expert-load counter, the controller's window logic against
fakes (in process), and the engines' hooks on 4 gloo ranks (pp = 1 with ep = 2 and pp = 2 x ep = 2): loads
summed over the layer's replicas, the same plan on every rank, the mover called with it, metrics written
through the monitor (CSV) for the whole pipeline. The mover is the placement-only fake of tests/fake_mover.py."""
import csv
import os
import types

import pytest
import torch

import fake_mover
from piper_ds.balance import BalanceController, controller
from piper_ds.config import BalanceConfig
from piper_ds.moe.placement import ExpertPlacement
from piper_ds.testing import run_distributed


# ----------------------------------------------------------------------------------- counter window tally
def test_window_tally_is_independent_of_collect():
    from piper_ds.moe import PiperMoE
    from piper_ds.tracking.expert_load import ExpertLoadCounter
    torch.manual_seed(0)
    model = torch.nn.Sequential(PiperMoE(16, 4, 8, kernels="reference"))
    counter = ExpertLoadCounter(model)
    x = torch.randn(10, 16)
    model(x)
    first = model[0].last_stats["tokens_per_expert"].clone()
    counts, _, _ = counter.collect()  # the metrics interval ends: the window goes on
    assert torch.equal(counts[0], first)
    model(x)
    model.eval()
    model(x)  # eval forwards count in neither tally
    model.train()
    (window,) = counter.take_window_counts()
    assert torch.equal(window, 2 * first) and int(window.sum()) == 2 * 10 * 2
    assert counter.take_window_counts() == [None]  # reset by the take
    counts, _, _ = counter.collect()
    assert torch.equal(counts[0], first)  # the take left the metrics tally alone
    assert counter.index_of(model[0]) == 0
    with pytest.raises(ValueError, match="not one of the 1 MoE layers"):
        counter.index_of(torch.nn.Linear(1, 1))
    counter.remove()


# ------------------------------------------------------------------------------------ controller, fakes
class _Counter:
    def __init__(self, layers):
        self.layers, self.rows = layers, None

    def index_of(self, layer):
        return self.layers.index(layer)

    def take_window_counts(self):
        rows, self.rows = self.rows, [None] * len(self.layers)
        return rows


class _Monitor:
    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events += events


def _layer(num_experts=8, ep=2):
    return types.SimpleNamespace(num_experts=num_experts, ep_size=ep, ep_rank=0,
                                 placement=ExpertPlacement(num_experts, ep))


def _setup(monkeypatch, migration=True, window=2, layers=None):
    monkeypatch.setattr(controller, "migrate_experts", fake_mover.fake_migrate_experts)
    monkeypatch.setattr(fake_mover, "CALLS", [])
    ticks = iter(range(0, 10**6, 1))  # the controller's clock: one second per reading
    monkeypatch.setattr(controller, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    layers = layers if layers is not None else [_layer(), _layer()]
    counter = _Counter(layers)
    engine = types.SimpleNamespace(monitor=_Monitor(), global_samples=64, piper_moe_layers=layers)
    cfg = BalanceConfig(migration=migration, window=window)
    return BalanceController(cfg, layers, counter, [10**6] * len(layers)), counter, engine


def test_controller_windows_plan_migrate_and_report(monkeypatch):
    ctrl, counter, engine = _setup(monkeypatch)
    hot = torch.tensor([10, 9, 1, 1, 1, 1, 1, 0])  # layer 0: ranks 21 vs 3
    flat = torch.tensor([2, 2, 2, 2, 2, 2, 2, 2])  # layer 1: balanced
    counter.rows = [hot, flat]
    assert ctrl.after_applied_step(engine) is None  # step 1 of a 2-step window
    report = ctrl.after_applied_step(engine)
    assert report.step == 2 and report.ratios == (1.75, 1.0) and report.step_seconds == 0.5  # 1 s, 2 steps
    assert report.plans[0].swaps == ((0, 4),) and report.plans[1].swaps == ()
    assert fake_mover.CALLS == [{0: [(0, 4)]}]  # only layers with swaps, indexed like piper_moe_layers
    assert engine.piper_moe_layers[0].placement.rank_of.tolist() == [1, 0, 0, 0, 0, 1, 1, 1]
    assert report.moves == 1 and report.bytes_sent == fake_mover.FAKE_BYTES_PER_EXPERT  # rank 0 sent expert 0
    written = {label: (value, step) for label, value, step in engine.monitor.events}
    assert written["Train/Samples/balance/rank_load_max_over_mean/layer_0"] == (1.75, 64)
    assert written["Train/Samples/balance/rank_load_max_over_mean_avg"][0] == pytest.approx(1.375)
    assert written["Train/Samples/balance/planned_max_over_mean_avg"][0] == pytest.approx(1.0)
    assert written["Train/Samples/balance/moves"][0] == 1.0
    assert written["Train/Samples/balance/bytes_moved"][0] == fake_mover.FAKE_BYTES_PER_EXPERT
    # the next window sees the loads under the new placement: balanced, nothing to do
    counter.rows = [hot, flat]
    ctrl.after_applied_step(engine)
    assert ctrl.after_applied_step(engine).ratios == (1.0, 1.0) and len(fake_mover.CALLS) == 1
    assert len(ctrl.reports) == 2


def test_controller_monitors_without_migrating(monkeypatch):
    ctrl, counter, engine = _setup(monkeypatch, migration=False, window=1)
    counter.rows = [torch.tensor([10, 9, 1, 1, 1, 1, 1, 0]), None]  # layer 1 ran no training forward
    report = ctrl.after_applied_step(engine)
    assert report.ratios == (1.75, 1.0) and report.plans == () and fake_mover.CALLS == []
    labels = {label for label, _, _ in engine.monitor.events}
    assert "Train/Samples/balance/rank_load_max_over_mean_avg" in labels
    assert not any("moves" in label for label in labels)


def test_controller_refuses_migration_it_cannot_do(monkeypatch):
    with pytest.raises(ValueError, match=r"1 PiperMoE layer\(s\) have ep_size 1 \(this rank's layers \[1\] of "
                                         r"ep_sizes \[2, 1\]\)"):
        _setup(monkeypatch, layers=[_layer(), _layer(8, 1)])
    with pytest.raises(ValueError, match="no PiperMoE layer"):
        _setup(monkeypatch, layers=[])
    ctrl, _, engine = _setup(monkeypatch, migration=False, layers=[])  # monitoring alone: nothing to do
    assert not ctrl.enabled and ctrl.after_applied_step(engine) is None
    ctrl, _, _ = _setup(monkeypatch, migration=False, layers=[_layer(8, 1)])  # ep 1, migration off: fine
    assert ctrl.enabled


# ------------------------------------------------------------------------------------- engines, 4 ranks
def _skew(layers, pattern):
    """Makes every rank route its tokens by ``pattern`` (global expert ids per token slot): a forward hook on
    each router replaces its top-k choice; the counts follow."""
    def hook(gate, inputs, route):
        T, K = route.topk_idx_TK.shape
        idx = torch.tensor(pattern, dtype=torch.int64).repeat(T * K // len(pattern) + 1)[:T * K].view(T, K)
        return route._replace(topk_idx_TK=idx, tokens_per_expert_E=torch.bincount(idx.flatten(),
                                                                                  minlength=gate.num_experts))
    for layer in layers:
        layer.deepspeed_moe.gate.register_forward_hook(hook)


# tokens go to experts 0 and 1 (rank 0 of ep 2 under the contiguous placement) 3 times as often as elsewhere
PATTERN = [0, 1, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7]
BALANCE = {"migration": True, "window": 2, "threshold": 1.05}
MOE = {"kernels": "reference", "transport": "flat"}


def _config(out_dir, job, pp, extra=None):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**6,
           "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "csv_monitor": {"enabled": True, "output_path": out_dir, "job_name": job},
           "piper": {"parallel": {"ep_size": 2, "pp_size": pp}, "balance": BALANCE,
                     "moe": MOE}}
    cfg.update(extra or {})
    return cfg


def _worker(rank, world, out_dir, fake):
    import piper_ds
    from piper_ds.data import RandomTokens
    from piper_ds.models import build_model
    from piper_ds.moe import PiperMoE
    from piper_ds.pipeline.engine import initialize_pipeline
    from piper_ds.pipeline.model import PiperPipelineModule
    from piper_ds.system.specs import ModelSpec
    if fake:
        fake_mover.install()
    spec = ModelSpec.preset("tiny", n_layers=3, n_dense_layers=1, num_experts=8, seq_len=8, vocab_size=64)
    out = {}
    # pp = 1: 4 ranks, two EP groups of 2
    model = build_model(spec, MOE, ep_size=2, seed=0)
    _skew(model.moe_layers(), PATTERN)
    engine, *_ = piper_ds.initialize(model=model, config=_config(out_dir, "pp1", 1))
    data = RandomTokens(64, 8, 2, seed=1)
    for step in range(4):
        for micro in range(2):
            logits, aux = engine(data.get("train", step, micro, rank)[0])
            engine.backward(model.loss(logits, data.get("train", step, micro, rank)[1]) + aux)
            engine.step()
    out["pp1"] = [(r.step, r.ratios, [p.swaps for p in r.plans], r.moves, r.bytes_sent, r.metrics)
                  for r in engine.balance.reports]
    out["pp1_rank_of"] = [m.placement.rank_of.tolist() for m in model.moe_layers()]
    out["pp1_bytes_per_expert"] = engine.balance.bytes_per_expert
    engine.destroy()
    # migration with ep_size 1 is refused at engine setup, on every rank (here pp = 1, below pp = 2; in this
    # order: DeepSpeed keeps the pipeline's model-parallel state for later engines)
    out["refused"] = [_refused(lambda cfg: piper_ds.initialize(model=build_model(spec, MOE, ep_size=1, seed=0),
                                                               config=cfg), 1)]
    # pp = 2 x ep = 2: stage 0 holds the embedding, the dense block and one MoE block, stage 1 the other
    module = PiperPipelineModule(spec, MOE, ep_size=2, num_stages=2, micro_batch=2, seed=0)
    layers = [m for m in module.modules() if isinstance(m, PiperMoE)]
    _skew(layers, PATTERN)
    pipe, *_ = initialize_pipeline(model=module, config=_config(out_dir, "pp2", 2, {"pipeline": {
        "use_reentrant": False}}))
    dp_rank = pipe.grid.get_data_parallel_rank()
    for step in range(4):
        pipe.train_batch(iter([tuple(t for t in data.get("train", step, m, dp_rank)) for m in range(2)]))
    out["pp2"] = [(r.step, r.ratios, [p.swaps for p in r.plans], r.moves, r.bytes_sent, r.metrics)
                  for r in pipe.balance.reports]
    out["pp2_layers"] = len(pipe.piper_moe_layers)
    out["pp2_bytes_per_expert"] = pipe.balance.bytes_per_expert
    out["stage"] = pipe.stage_id
    pipe.destroy()
    out["refused"].append(_refused(lambda cfg: initialize_pipeline(
        model=PiperPipelineModule(spec, MOE, ep_size=1, num_stages=2, micro_batch=2, seed=0), config=cfg), 2))
    piper_ds.shutdown()
    return out


def _refused(build, pp):
    """The ValueError's message when ``build(ds_config)`` sets up an engine with migration on and ep_size 1."""
    cfg = _config("unused", "unused", pp, {"pipeline": {"use_reentrant": False}})
    del cfg["csv_monitor"]
    cfg["piper"]["parallel"]["ep_size"] = 1
    try:
        build(cfg)
    except ValueError as err:
        return str(err)
    return None


def _csv(path):
    with open(path) as f:
        return list(csv.reader(f))[1:]


def test_engines_migrate_and_report(tmp_path):
    _check_engines(run_distributed(_worker, 4, str(tmp_path), True, timeout=420), tmp_path, fake=True)


def test_engines_with_the_mover(tmp_path):
    """The same runs with the real mover (weights and optimizer state move too): it must accept the controller's
    calls from both engines' optimizer-step hooks."""
    _check_engines(run_distributed(_worker, 4, str(tmp_path), False, timeout=420), tmp_path, fake=False)


def _check_engines(res, tmp_path, fake):
    # pp = 1: every rank the same windows; the skew is the same on both MoE layers
    assert all(r["pp1"] == res[0]["pp1"] for r in res)
    first, second = res[0]["pp1"]
    step, ratios, swaps, moves, sent, metrics = first
    assert step == 2 and ratios == (1.5, 1.5)  # EP rank 0 (experts 0-3) gets 24 of every 32 assignments
    assert swaps[0] == swaps[1] and len(swaps[0]) >= 1 and moves == 2 * len(swaps[0])
    # every swap: one expert sent by each of its two EP ranks, in both EP groups (4 ranks); the real mover's
    # count must match the controller's bytes rule (it also sends a few bytes of bookkeeping per expert)
    per_rank = fake_mover.FAKE_BYTES_PER_EXPERT if fake else res[0]["pp1_bytes_per_expert"][0]
    assert sent == pytest.approx(4 * moves * per_rank, rel=0 if fake else 1e-3)
    assert metrics["balance/bytes_moved"] == sent and metrics["balance/moves"] == moves
    assert second[1] == (1.0, 1.0) and second[3] == 0  # balanced after the move: nothing more
    assert all(r["pp1_rank_of"] == res[0]["pp1_rank_of"] for r in res)
    rows = _csv(tmp_path / "pp1" / "Train_Samples_balance_rank_load_max_over_mean_avg.csv")
    assert [float(v) for _, v in rows] == [1.5, 1.0]
    assert [int(s) for s, _ in rows] == [2 * 2 * 2 * 4, 4 * 2 * 2 * 4]  # samples seen: steps x gas x mb x dp
    # pp = 2: each stage one MoE layer, the figures gathered over the pipeline: two layers on every rank
    assert [r["pp2_layers"] for r in res] == [1, 1, 1, 1]
    stage0 = [r for r in res if r["stage"] == 0]
    assert all(r["pp2"][0][5] == res[0]["pp2"][0][5] for r in res)  # the whole pipeline's metrics everywhere
    assert all(r["pp2"] == stage0[0]["pp2"] for r in stage0)
    metrics = res[0]["pp2"][0][5]
    assert metrics["balance/rank_load_max_over_mean/layer_0"] == metrics["balance/rank_load_max_over_mean/layer_1"] \
        == 1.5
    assert metrics["balance/moves"] == 2 * len(res[0]["pp2"][0][2][0])  # both stages' swaps
    per_rank = fake_mover.FAKE_BYTES_PER_EXPERT if fake else res[0]["pp2_bytes_per_expert"][0]
    assert metrics["balance/bytes_moved"] == pytest.approx(2 * metrics["balance/moves"] * per_rank,
                                                           rel=0 if fake else 1e-3)  # one EP group per stage
    for layer in (0, 1):
        path = tmp_path / "pp2" / f"Train_Samples_balance_rank_load_max_over_mean_layer_{layer}.csv"
        assert [float(v) for _, v in _csv(path)] == [1.5, 1.0]
    assert os.path.exists(tmp_path / "pp2" / "Train_Samples_balance_migration_s.csv")
    for r in res:
        assert all(m is not None and "piper.balance.migration is on but" in m and "have ep_size 1" in m
                   for m in r["refused"]) and len(r["refused"]) == 2, r["refused"]
