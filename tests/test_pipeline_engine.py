"""pp=2 x ep=2 on 4 gloo ranks: the pipelined engine matches the unpipelined reference (loss and every
parameter's gradient) for 1F1B, for the overlap schedule and for DualPipeV (two virtual stages per rank); the
aux loss reaches both ranks' routers; checkpoints save and resume (1F1B, DualPipeV). Gradients are read back
from one SGD step with lr = 2**10 (delta / lr)."""
import os

import pytest
import torch

from piper_ds.system.specs import ModelSpec
from piper_ds.testing import run_distributed

LR = 1024.0
MB, GAS, DP = 4, 2, 2
GAS_OF = {"1f1b": GAS, "overlap": GAS, "dualpipev": 4}  # DualPipeV needs >= 2 x pp micro-batches
SPEC = ModelSpec.preset("tiny", n_layers=4, n_dense_layers=1, n_shared_experts=1, seq_len=8, vocab_size=64)
MOE = {"aux_loss_coef": 0.05, "kernels": "reference", "transport": "flat"}


def _batch(dp_rank, m):
    g = torch.Generator().manual_seed(1000 * dp_rank + m)
    ids = torch.randint(0, SPEC.vocab_size, (MB, SPEC.seq_len), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def _engine(schedule, seed=7, ckpt=None):
    from piper_ds.pipeline.engine import initialize_pipeline
    from piper_ds.pipeline.model import PiperDualPipeVModule, PiperPipelineModule
    cls = PiperDualPipeVModule if schedule == "dualpipev" else PiperPipelineModule
    module = cls(SPEC, MOE, ep_size=2, num_stages=2, micro_batch=MB, seed=seed)
    config = {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": GAS_OF[schedule],
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "steps_per_print": 10**6, "pipeline": {"use_reentrant": False},
              "piper": {"parallel": {"ep_size": 2, "pp_size": 2}, "topology": {"gpus_per_node": 4}}}
    engine, *_ = initialize_pipeline(model=module, optimizer=lambda ps: torch.optim.SGD(ps, lr=LR),
                                     config=config, schedule=schedule)
    return engine, module


def _global_params(module):
    """name -> tensor with experts keyed by global expert id (``<name>#<e>``)."""
    out = {}
    for name, p in module.named_parameters():
        if getattr(p, "allreduce", True) is False:
            moe = next(m for n, m in module.named_modules() if name.startswith(n + ".") and hasattr(m, "placement"))
            for slot, e in enumerate(moe.placement.local_experts(moe.ep_rank)):
                out[f"{name}#{int(e)}"] = p.detach()[slot].clone()
        else:
            out[name] = p.detach().clone()
    return out


def _step(engine, module, dp_rank, gas=GAS):
    before = _global_params(module)
    loss = engine.train_batch(iter([_batch(dp_rank, m) for m in range(gas)]))
    after = _global_params(module)
    return float(loss), {k: (before[k] - after[k]) / LR for k in before}


def worker(rank, world_size, ckpt_dir):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    dp_rank = rank % DP
    res = {}
    for schedule in ("1f1b", "overlap", "dualpipev"):
        engine, module = _engine(schedule)
        res[schedule] = _step(engine, module, dp_rank, GAS_OF[schedule])
        res[f"parts_{schedule}"] = module.parts
        res[f"engine_{schedule}"] = type(engine).__name__
        if schedule != "overlap":  # checkpoint after one step, resume into a differently seeded model
            gas, tag = GAS_OF[schedule], f"t1_{schedule}"
            engine.save_checkpoint(ckpt_dir, tag=tag)
            res[f"next_loss_{schedule}"] = float(engine.train_batch(iter([_batch(dp_rank, m + 10)
                                                                          for m in range(gas)])))
            fresh, fresh_module = _engine(schedule, seed=99)
            fresh.load_checkpoint(ckpt_dir, tag=tag)
            res[f"resumed_loss_{schedule}"] = float(fresh.train_batch(iter([_batch(dp_rank, m + 10)
                                                                            for m in range(gas)])))
            fresh.destroy()
        engine.destroy()
    return res


def _reference(halves, aux=True, gas=GAS):
    from piper_ds.pipeline.model import lm_loss, reference_layers, reference_loss
    moe = dict(MOE, aux_loss_coef=MOE["aux_loss_coef"] if aux else 0.0)
    layers = reference_layers(SPEC, moe, seed=7)
    losses = [reference_loss(layers, *_batch(d, m), halves=halves) for d in range(DP) for m in range(gas)]
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = {}
    for name, p in layers.named_parameters():
        idx, rest = name.split(".", 1)
        key = f"{idx}.{rest}"
        if getattr(p, "allreduce", True) is False:
            for e in range(p.shape[0]):
                grads[f"{key}#{e}"] = p.grad[e]
        else:
            grads[key] = p.grad
    return float(loss.detach()), grads


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(worker, 4, str(tmp_path_factory.mktemp("ckpt")), timeout=420)


@pytest.mark.parametrize("schedule,halves", [("1f1b", 1), ("overlap", 2), ("dualpipev", 1)])
def test_pipeline_matches_reference(runs, schedule, halves):
    ref_loss, ref = _reference(halves, gas=GAS_OF[schedule])
    _, no_aux = _reference(halves, aux=False, gas=GAS_OF[schedule])
    seen = set()
    for rank, res in enumerate(runs):
        loss, grads = res[schedule]
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"rank {rank}"
        for key, g in grads.items():
            torch.testing.assert_close(g, ref[key], rtol=2e-4, atol=2e-7, msg=f"{schedule} rank {rank} {key}")
            seen.add(key)
    assert seen == set(ref), f"parameters not covered: {sorted(set(ref) - seen)[:5]}"
    # the aux loss's gradient reaches the routers of every (virtual) stage holding MoE blocks, on both ranks
    parts = runs[0][f"parts_{schedule}"]
    n = len(parts) - 1  # 2 stages; DualPipeV: 4 virtual stages, rank r holding r and 3 - r
    assert n == (4 if schedule == "dualpipev" else 2), parts
    engine = "PiperDualPipeVEngine" if schedule == "dualpipev" else "PiperPipelineEngine"
    assert all(res[f"engine_{schedule}"] == engine for res in runs)
    routers = [k for k in ref if "gate.wg" in k]
    stages = {next(s for s in range(n) if parts[s] <= int(k.split(".")[0]) < parts[s + 1]) for k in routers}
    ranks = {min(s, n - 1 - s) if schedule == "dualpipev" else s for s in stages}
    assert ranks == {0, 1}, f"partition {parts} leaves a rank without MoE layers"
    for k in routers:
        assert not torch.allclose(ref[k], no_aux[k], rtol=1e-3, atol=1e-6), f"aux does not reach {k}"


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_checkpoint_resume(runs, schedule):
    for rank, res in enumerate(runs):
        assert res[f"resumed_loss_{schedule}"] == pytest.approx(res[f"next_loss_{schedule}"], rel=1e-6), \
            f"rank {rank}"
        assert res[f"resumed_loss_{schedule}"] != pytest.approx(res[schedule][0], rel=1e-6)  # another batch
