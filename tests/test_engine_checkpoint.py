"""Checkpoints through PiperEngine (DeepSpeed's format: one file per expert, ZeRO-2 optimizer shards):
4 steps straight == 2 steps + save + resume into a differently initialised model + 2 steps, at ep=2 with
aux-loss-free balancing on (its selection bias must round-trip); experts stay distinct per EP rank."""
import torch

from piper_ds.testing import run_distributed

MODEL = {"preset": "tiny", "n_layers": 3, "n_dense_layers": 1, "n_shared_experts": 1, "seq_len": 16}


def _config():
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2,
                                                          "warmup_num_steps": 3}},
            "piper": {"model": MODEL, "moe": {"bias_update_rate": 0.05, "kernels": "reference"},
                      "parallel": {"ep_size": 2}}}


def _engine(seed):
    import piper_ds
    from piper_ds.config import parse_piper_config
    from piper_ds.models import build_model
    cfg = _config()
    piper = parse_piper_config(cfg)
    model = build_model(piper.model, piper.moe_for_model(), ep_size=2, seed=seed)
    engine, _, _, _ = piper_ds.initialize(model=model, config=cfg)
    return engine, model


def _steps(engine, model, rank, start, stop):
    from piper_ds.data import RandomTokens
    data = RandomTokens(256, 16, 2, seed=5)
    losses = []
    for step in range(start, stop):
        x, y = data.get("train", step, 0, rank)
        logits, aux = engine(x)
        loss = model.loss(logits, y) + aux
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _local_experts(model):
    return {f"{i}.{n}": p.detach().clone() for i, layer in enumerate(model.moe_layers())
            for n, p in layer.deepspeed_moe.experts.named_parameters()}


@torch.no_grad()
def _nudge(model):
    """A fixed, non-zero offset to every selection bias (sign updates can cancel to exactly 0 in 2 steps)."""
    for layer in model.moe_layers():
        bias = layer.deepspeed_moe.gate.selection_bias
        bias += torch.linspace(-0.013, 0.017, bias.numel())


def _biases(model):
    return [layer.deepspeed_moe.gate.selection_bias.clone() for layer in model.moe_layers()]


def _worker(rank, world, save_dir):
    import piper_ds
    engine, model = _engine(seed=0)
    straight = _steps(engine, model, rank, 0, 2)
    _nudge(model)
    straight += _steps(engine, model, rank, 2, 4)
    engine.destroy()

    engine, model = _engine(seed=0)
    first = _steps(engine, model, rank, 0, 2)
    _nudge(model)
    engine.save_checkpoint(save_dir)
    saved_experts, saved_bias = _local_experts(model), _biases(model)
    engine.destroy()

    engine, model = _engine(seed=99)  # different init: everything must come from the checkpoint
    fresh = _local_experts(model)
    path, _ = engine.load_checkpoint(save_dir)
    assert path is not None, f"no checkpoint loaded from {save_dir}"
    loaded_experts, loaded_bias, step = _local_experts(model), _biases(model), engine.global_steps
    resumed = _steps(engine, model, rank, 2, 4)
    piper_ds.shutdown(engine)
    return dict(straight=straight, first=first, resumed=resumed, saved=saved_experts, loaded=loaded_experts,
                fresh=fresh, saved_bias=saved_bias, loaded_bias=loaded_bias, step=step)


def test_resume_gives_the_same_losses_and_distinct_experts(tmp_path):
    r0, r1 = run_distributed(_worker, 2, str(tmp_path / "ckpt"), timeout=300)
    for rank, r in enumerate((r0, r1)):
        assert r["step"] == 2
        torch.testing.assert_close(torch.tensor(r["first"] + r["resumed"]), torch.tensor(r["straight"]),
                                   rtol=1e-6, atol=1e-6, msg=lambda m: f"rank {rank}: {m}")
        for name, saved in r["saved"].items():
            assert torch.equal(r["loaded"][name], saved), f"rank {rank} expert {name} not restored"
            assert not torch.equal(r["fresh"][name], saved)
        for saved, loaded in zip(r["saved_bias"], r["loaded_bias"]):
            assert saved.abs().sum() > 0 and torch.equal(saved, loaded), "selection bias not restored"
    for name in r0["loaded"]:  # every EP rank reloaded its own experts, not the first ones
        assert not torch.allclose(r0["loaded"][name], r1["loaded"][name]), name
