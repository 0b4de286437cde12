"""The optimizer-state accessor and the layout-free checkpoint state on a GPU, as users run them: bf16, torch's
fused AdamW, NCCL, one rank, ZeRO-0 (the bf16 wrapper DeepSpeed picks there) and ZeRO-2. After 3 steps: every
parameter's master weights cast to bf16 are the module parameter; a checkpoint loads into a fresh engine both
through DeepSpeed's own load (same layout) and through piper_state/ (the path of a resume under another
layout), and in both cases the optimizer state equals the saved one and the next two steps give the same losses,
bit for bit. Runs on the GPU machine (``pytest -m gpu``)."""
import os

import pytest
import torch

from piper_ds.testing import run_distributed

pytestmark = pytest.mark.gpu

STEPS = 3


def _engine(stage: int, seed: int, device: str):
    import piper_ds
    from expert_runs import ds_config
    from piper_ds.config import parse_piper_config
    from piper_ds.models import build_model
    cfg = ds_config(1, 1, stage, bf16=True)
    cfg["optimizer"]["params"]["fused"] = True
    piper = parse_piper_config(cfg)
    model = build_model(piper.model, piper.moe_for_model(), ep_size=1, seed=seed).to(device)
    return piper_ds.initialize(model=model, config=cfg)[0], model


def _steps(eng, model, start: int, stop: int) -> list:
    return [_step(eng, model, step) for step in range(start, stop)]


def _step(eng, model, step: int) -> float:
    from expert_runs import batch
    x, y = (t.to(eng.device) for t in batch(step, 0, 1))
    logits, aux = eng(x)
    loss = model.loss(logits, y) + aux
    eng.backward(loss)
    eng.step()
    return float(loss.detach())


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) and a[k][3] == b[k][3]
        and a[k][2].keys() == b[k][2].keys() and all(torch.equal(a[k][2][m], b[k][2][m]) for m in a[k][2])
        for k in a)


def _on_cpu(rec):
    return tuple(v.cpu() if torch.is_tensor(v) else ({m: t.cpu() for m, t in v.items()} if isinstance(v, dict) else v)
                 for v in rec)


def _worker(rank, world, root, device="cuda"):
    from expert_runs import training_state
    from piper_ds.runtime import layout_free
    from piper_ds.runtime.optim_state import optimizer_state
    if device == "cuda":
        torch.cuda.set_device(rank)
    out = {}
    for stage in (0, 2):
        eng, model = _engine(stage, 0, device)
        _steps(eng, model, 0, STEPS)
        access = optimizer_state(eng.optimizer)
        cast = all(torch.equal(access.get(p).master.to(p.dtype), p.detach()) for p in eng.module.parameters())
        saved = {k: _on_cpu(rec) for k, rec in training_state(eng).items()}
        save_dir = os.path.join(root, f"zero{stage}")
        eng.save_checkpoint(save_dir, tag="t")
        next_losses = _steps(eng, model, STEPS, STEPS + 2)  # the second one depends on the optimizer state
        eng.destroy()
        result = dict(optimizer=type(eng.optimizer).__name__, cast=cast)
        for how in ("deepspeed", "piper_state"):
            fresh, fresh_model = _engine(stage, 99, device)
            fresh.load_checkpoint(save_dir, tag="t", load_optimizer_states=how == "deepspeed")
            if how == "piper_state":
                layout_free.load_state(fresh, os.path.join(save_dir, "t"))
            state = {k: _on_cpu(rec) for k, rec in training_state(fresh).items()}
            result[how] = dict(same_state=_same_state(state, saved),
                               same_next_losses=_steps(fresh, fresh_model, STEPS, STEPS + 2) == next_losses)
            fresh.destroy()
        out[stage] = result
    return out


def test_optimizer_state_and_layout_free_checkpoints_on_a_gpu(tmp_path):
    (res,) = run_distributed(_worker, 1, str(tmp_path), timeout=300, backend="nccl")
    assert res[0]["optimizer"] != res[2]["optimizer"], res  # two different DeepSpeed wrappers were exercised
    for stage, r in res.items():
        assert r["cast"], (stage, r)
        for how in ("deepspeed", "piper_state"):
            assert r[how] == dict(same_state=True, same_next_losses=True), (stage, how, r)
