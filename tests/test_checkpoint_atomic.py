"""Atomic checkpoints through PiperEngine on 2 gloo ranks (ep 2, ZeRO-2): every kind of checkpoint file
(model states, a ZeRO optimizer shard, an expert file) truncated, and an expert file deleted, makes a load of
that checkpoint fail naming the file, and an automatic load fall back to the previous complete checkpoint,
saying which and why; ``keep_last`` deletes the oldest."""
import contextlib
import io
import os
import shutil

import torch

from piper_ds.testing import run_distributed

MODEL = {"preset": "tiny", "n_layers": 3, "n_dense_layers": 1, "n_shared_experts": 1, "seq_len": 16}
#: (kind, file of global_step4, what is done to it)
CASES = [("model states", "mp_rank_00_model_states.pt", "truncate"),
         ("ZeRO optimizer shard", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "truncate"),
         ("expert file", "layer_1_expert_3_mp_rank_00_model_states.pt", "truncate"),
         ("expert file", "layer_0_expert_0_mp_rank_00_model_states.pt", "delete")]


def _engine():
    import piper_ds
    from piper_ds.config import parse_piper_config
    from piper_ds.models import build_model
    cfg = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**6, "zero_optimization": {"stage": 2},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "piper": {"model": MODEL, "moe": {"kernels": "reference"}, "parallel": {"ep_size": 2},
                     "checkpoint": {"keep_last": 2}}}
    piper = parse_piper_config(cfg)
    model = build_model(piper.model, piper.moe_for_model(), ep_size=2, seed=0)
    engine, _, _, _ = piper_ds.initialize(model=model, config=cfg)
    return engine, model


def _steps(engine, model, rank, start, stop):
    from piper_ds.data import RandomTokens
    data = RandomTokens(256, 16, 2, seed=5)
    for step in range(start, stop):
        x, y = data.get("train", step, 0, rank)
        logits, aux = engine(x)
        engine.backward(model.loss(logits, y) + aux)
        engine.step()


def _damage(path, action):
    if action == "delete":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _worker(rank, world, save_dir):
    import deepspeed.comm as dist

    import piper_ds
    from piper_ds.runtime.checkpoint import CheckpointError
    engine, model = _engine()
    _steps(engine, model, rank, 0, 2)
    engine.save_checkpoint(save_dir)
    _steps(engine, model, rank, 2, 4)
    engine.save_checkpoint(save_dir)
    results = []
    for _, name, action in CASES:
        path = os.path.join(save_dir, "global_step4", name)
        if rank == 0:
            shutil.copy(path, path + ".bak")
            _damage(path, action)
        dist.barrier()
        try:
            engine.load_checkpoint(save_dir, tag="global_step4")
            strict = None
        except CheckpointError as err:
            strict = str(err)
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            loaded, _ = engine.load_checkpoint(save_dir)
        results.append(dict(strict=strict, loaded=loaded, step=engine.global_steps, said=said.getvalue()))
        dist.barrier()
        if rank == 0:
            os.replace(path + ".bak", path)
        dist.barrier()
    engine.load_checkpoint(save_dir)
    repaired = engine.global_steps
    _steps(engine, model, rank, 4, 6)
    engine.save_checkpoint(save_dir)  # the third: keep_last 2 removes global_step2
    kept = sorted(n for n in os.listdir(save_dir) if n.startswith("global_step"))
    piper_ds.shutdown(engine)
    return dict(results=results, repaired=repaired, kept=kept)


def test_damaged_files_are_named_and_the_previous_checkpoint_is_loaded(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    r0, r1 = run_distributed(_worker, 2, save_dir, timeout=300)
    for rank, r in enumerate((r0, r1)):
        for (kind, name, action), got in zip(CASES, r["results"]):
            what = f"rank {rank}, {action}d {kind} {name}"
            assert got["strict"] is not None and name in got["strict"], (what, got["strict"])
            assert os.path.join(save_dir, "global_step4") in got["strict"], what
            assert got["loaded"] is not None and got["step"] == 2, (what, got)
        assert r["repaired"] == 4 and r["kept"] == ["global_step4", "global_step6"], r
    for (kind, name, action), got in zip(CASES, r0["results"]):  # rank 0 says which and why
        assert name in got["said"], (kind, got["said"])
        assert f"loading {os.path.join(save_dir, 'global_step2')} (step 2) instead" in got["said"], got["said"]
        assert f"loaded checkpoint {os.path.join(save_dir, 'global_step2')} (step 2)" in got["said"], got["said"]
        assert ("is missing" if action == "delete" else "truncated") in got["said"], got["said"]
    assert all(got["said"] == "" for got in r1["results"])  # one copy of every message


def test_a_file_deepspeed_cannot_read_is_named(tmp_path):
    """Without a manifest (a checkpoint DeepSpeed wrote itself) the load's own error names the file."""
    import pytest
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from piper_ds.runtime.checkpoint import CheckpointError, RecordingCheckpointEngine
    path = str(tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"module": {"w": torch.ones(1000)}}, path)
    _damage(path, "truncate")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        RecordingCheckpointEngine(TorchCheckpointEngine()).load(path)
