"""Metrics through engine.monitor: CSV rows, W&B offline run files with the full ds_config in the run config
and expert-load histograms; the aux-loss-free bias update after each optimizer step; piper.topology reaching
the MoE transports."""
import csv
import glob
import os

import torch

from piper_ds.testing import run_distributed

MODEL = {"preset": "tiny", "n_layers": 2, "n_dense_layers": 1, "seq_len": 16}


def _worker(rank, world, out_dir):
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=out_dir, WANDB_SILENT="true")
    import piper_ds
    from piper_ds.config import parse_piper_config
    from piper_ds.data import RandomTokens
    from piper_ds.models import build_model
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**6,
           "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "csv_monitor": {"enabled": True, "output_path": out_dir, "job_name": "csv"},
           "wandb": {"enabled": True, "project": "piper-ds-test"},
           "piper": {"model": MODEL, "moe": {"bias_update_rate": 0.01, "kernels": "reference"},
                     "parallel": {"ep_size": 2},
                     "tracking": {"expert_load_interval": 1},
                     "topology": {"gpus_per_node": 1}}}  # 2 ranks posing as 2 nodes: hierarchical all-to-all
    piper = parse_piper_config(cfg)
    model = build_model(piper.model, piper.moe_for_model(), ep_size=2, seed=0)
    engine, _, _, _ = piper_ds.initialize(model=model, config=cfg)
    transports = {type(layer.deepspeed_moe.dispatcher.transport).__name__ for layer in model.moe_layers()}
    assert transports == {"HierarchicalAllToAll"}, transports
    data = RandomTokens(256, 16, 2, seed=3)
    bias_changes, loads = [], []
    for step in range(3):
        before = model.moe_layers()[0].deepspeed_moe.gate.selection_bias.clone()
        for micro in range(2):
            x, y = data.get("train", step, micro, rank)
            logits, aux = engine(x)
            loss = model.loss(logits, y) + aux
            engine.backward(loss)
            after_micro = model.moe_layers()[0].deepspeed_moe.gate.selection_bias.clone()
            engine.step()
            if micro == 0:  # not a boundary: no update yet
                assert torch.equal(after_micro, before)
        bias_changes.append(float((model.moe_layers()[0].deepspeed_moe.gate.selection_bias - before).abs().sum()))
        load = engine.collect_expert_load(histograms=True)
        loads.append(load)
        engine.write_metrics({"loss": loss.item(), "aux_loss": aux.item(), **load})
    piper_ds.shutdown(engine)
    return bias_changes, loads


def test_csv_and_wandb_offline(tmp_path):
    results = run_distributed(_worker, 2, str(tmp_path), timeout=300)
    for bias_changes, loads in results:
        assert all(c > 0 for c in bias_changes), bias_changes  # the bias moved after every optimizer step
        for load in loads:
            assert load["load_max_over_mean"] >= 1.0 and load["dropped_pct"] == 0.0
    assert results[0][1] == results[1][1]  # summed over ranks: every rank reports the same load
    with open(tmp_path / "csv" / "Train_Samples_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"] and len(rows) == 4
    assert [int(r[0]) for r in rows[1:]] == [8, 16, 24]  # x-axis: samples, like DeepSpeed's own lr events
    assert all(float(r[1]) > 0 for r in rows[1:])
    for name in ("aux_loss", "load_max_over_mean", "dropped_pct"):
        assert os.path.exists(tmp_path / "csv" / f"Train_Samples_{name}.csv"), name
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 only
    (records, ) = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    with open(records, "rb") as f:  # offline runs keep config and history in this record log
        data = f.read()
    for needle in (b"csv_monitor", b"bias_update_rate", b"expert_load_interval",  # the full ds_config
                   b"Train/Samples/loss", b"Train/Samples/load_max_over_mean", b"Train/ExpertLoad/layer_0"):
        assert needle in data, needle
