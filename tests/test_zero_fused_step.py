"""The fused ZeRO step (piper_ds.runtime.zero_step) against DeepSpeed's own step, on 2 gloo ranks (tier 3).

Without active clipping the two steps give the same bits (losses, weights, Adam moments); with clipping the
coefficient comes from a norm accumulated in fp32 instead of fp64, so they agree to its rounding. The pipeline
engine takes the same step. Checkpoints written by one step resume under the other.
"""
import pytest
import torch

from piper_ds.testing import run_distributed
from test_moe_engine_step import D, TinyMoEModel


def _config(mode, stage, ep, clip, precision):
    """precision: "fp32", "bf16", or "bf16+fp32" (bf16 with gradients accumulated in fp32: DeepSpeed then keeps
    a partition's gradients in one flat buffer)."""
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "steps_per_print": 10**6,
           "zero_optimization": {"stage": stage}, "gradient_clipping": clip,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
           "piper": {"parallel": {"ep_size": ep}, "optimizer": {"fused_step": mode},
                     "runtime": {"heartbeat": False}}}
    if precision != "fp32":
        cfg["bf16"] = {"enabled": True}
    if precision == "bf16+fp32":
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def _train(rank, mode, stage, ep, clip, precision, steps=3, load=None, save=None, poison=None):
    """poison: (step, micro) at which rank 0 feeds one NaN, so every gradient of that step is non-finite."""
    import piper_ds
    torch.manual_seed(0)
    model = TinyMoEModel(ep)
    engine, *_ = piper_ds.initialize(model=model, config=_config(mode, stage, ep, clip, precision))
    if load is not None:
        engine.load_checkpoint(load)
    losses, norms = [], []
    for _ in range(steps):
        for micro in range(2):  # the data of a step depends on the step alone, so a resumed run sees the same
            gen = torch.Generator().manual_seed(100 + rank + 1000 * engine.global_steps + 10 * micro)
            x = torch.randn(4, 6, D, generator=gen)
            if rank == 0 and poison == (engine.global_steps, micro):
                x[0, 0, 0] = float("nan")
            loss = engine(x if precision == "fp32" else x.bfloat16())
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    if save is not None:
        engine.save_checkpoint(save)
    out = dict(losses=losses, norms=norms, kind=type(engine.optimizer).__name__, skipped=engine.skipped_steps,
               params={n: p.detach().float().clone() for n, p in model.named_parameters()},
               state=[{k: v.clone() for k, v in s.items()} for s in engine.optimizer.optimizer.state.values()])
    engine.destroy()
    return out


def _compare_worker(rank, world_size, stage, ep, clip, precision):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    return {mode: _train(rank, mode, stage, ep, clip, precision) for mode in ("on", "off")}


@pytest.mark.parametrize("stage,ep,clip,precision", [(2, 2, 0.0, "fp32"), (1, 1, 0.0, "fp32"), (2, 2, 1e-4, "bf16"),
                                                     (1, 2, 1e-4, "fp32"), (2, 2, 0.0, "bf16+fp32")])
def test_fused_step_equals_deepspeeds(stage, ep, clip, precision):
    results = run_distributed(_compare_worker, 2, stage, ep, clip, precision, timeout=300)
    for rank, res in enumerate(results):
        fused, ds = res["on"], res["off"]
        assert (fused["kind"], ds["kind"]) == ("FusedStepZeroOptimizer", "DeepSpeedZeroOptimizer")
        exact = clip == 0.0
        if not exact:  # the clip must have acted, or this case would test nothing more than the first
            assert min(ds["norms"]) > clip
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
        assert fused["losses"] == pytest.approx(ds["losses"], rel=tol["rtol"], abs=tol["atol"])
        assert fused["norms"] == pytest.approx(ds["norms"], rel=1e-6)
        for name in ds["params"]:
            torch.testing.assert_close(fused["params"][name], ds["params"][name], **tol,
                                       msg=f"{name}, ZeRO-{stage} ep {ep} clip {clip} {precision}, rank {rank}")
        assert len(fused["state"]) == len(ds["state"]) > 0
        for got, want in zip(fused["state"], ds["state"]):
            assert got.keys() == want.keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert got["step"].device == want["step"].device and float(got["step"]) == float(want["step"]) == 3
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(got[key], want[key], **tol)
    assert results[0]["on"]["losses"][0] != results[0]["on"]["losses"][-1]  # it trained


def _overflow_worker(rank, world_size, stage, precision):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    return {mode: _train(rank, mode, stage, 2, 0.0, precision, poison=(1, 0)) for mode in ("on", "off")}


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (1, "fp32")])
def test_a_non_finite_gradient_skips_the_step_as_deepspeeds_does(stage, precision):
    # bf16: DeepSpeed's overflow check (on by default), which the fused step takes from the norm; fp32: the norm
    for rank, res in enumerate(run_distributed(_overflow_worker, 2, stage, precision, timeout=300)):
        fused, ds = res["on"], res["off"]
        assert (fused["kind"], ds["kind"]) == ("FusedStepZeroOptimizer", "DeepSpeedZeroOptimizer")
        assert fused["skipped"] == ds["skipped"] == 1, rank  # on both ranks: the overflow is all-reduced
        # NaN where the poisoned batch ran (rank 0's, and rank 1's too where the tokens crossed ranks), else equal
        assert [x if x == x else "nan" for x in fused["losses"]] == [x if x == x else "nan" for x in ds["losses"]]
        assert ds["losses"][2] != ds["losses"][2] and all(x == x for x in ds["losses"][3:]), ds["losses"]
        for name, value in ds["params"].items():
            assert torch.isfinite(value).all() and torch.equal(fused["params"][name], value), (name, rank)
        for got, want in zip(fused["state"], ds["state"]):
            assert float(got["step"]) == float(want["step"]) == 2  # the skipped step is not counted
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got[key], want[key])


def _resume_worker(rank, world_size, path):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    whole = _train(rank, "on", 2, 2, 0.0, "fp32", steps=4)
    _train(rank, "on", 2, 2, 0.0, "fp32", steps=2, save=f"{path}/fused")
    _train(rank, "off", 2, 2, 0.0, "fp32", steps=2, save=f"{path}/deepspeed")
    return whole, {first: _train(rank, then, 2, 2, 0.0, "fp32", steps=2, load=f"{path}/{first}")
                   for first, then in (("fused", "off"), ("deepspeed", "on"))}


def test_checkpoints_resume_under_either_step(tmp_path):
    for whole, resumed in run_distributed(_resume_worker, 2, str(tmp_path), timeout=300):
        for first, res in resumed.items():
            assert res["losses"] == whole["losses"][4:], first
            for name, value in whole["params"].items():
                assert torch.equal(res["params"][name], value), (first, name)


def _pipeline_worker(rank, world_size):
    import deepspeed

    from piper_ds.pipeline.engine import initialize_pipeline
    from piper_ds.pipeline.model import PiperPipelineModule
    from piper_ds.system.specs import ModelSpec
    deepspeed.init_distributed(dist_backend="gloo")
    spec = ModelSpec.preset("tiny", n_layers=4, n_dense_layers=1, n_shared_experts=1, seq_len=8, vocab_size=64)
    out = {}
    for mode in ("on", "off"):
        module = PiperPipelineModule(spec, {"kernels": "reference", "transport": "flat"}, ep_size=1, num_stages=2,
                                     micro_batch=2, seed=7)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**6,
                  "zero_optimization": {"stage": 1}, "gradient_clipping": 0.0, "pipeline": {"use_reentrant": False},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
                  "piper": {"parallel": {"pp_size": 2}, "optimizer": {"fused_step": mode},
                            "runtime": {"heartbeat": False}}}
        engine = initialize_pipeline(model=module, config=config)[0]
        losses = []
        for step in range(3):
            batches = []
            for micro in range(2):
                ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 * step + micro))
                batches.append((ids, torch.roll(ids, -1, dims=1)))
            losses.append(float(engine.train_batch(iter(batches))))
        out[mode] = dict(kind=type(engine.optimizer).__name__, losses=losses,
                         params={n: p.detach().clone() for n, p in module.named_parameters()})
        engine.destroy()
    return out


def test_pipeline_engine_takes_the_fused_step_with_the_same_result():
    for res in run_distributed(_pipeline_worker, 2, timeout=300):  # pp = 2: each rank one stage
        fused, ds = res["on"], res["off"]
        assert (fused["kind"], ds["kind"]) == ("FusedStepZeroOptimizer", "DeepSpeedZeroOptimizer")
        assert fused["losses"] == ds["losses"] and fused["losses"][0] != fused["losses"][-1]
        for name, value in ds["params"].items():
            assert torch.equal(fused["params"][name], value), name


def _unsupported_worker(rank, world_size, mode, stage, sgd):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import piper_ds
    deepspeed.init_distributed(dist_backend="gloo")
    model = TinyMoEModel(1)
    cfg, optimizer = _config(mode, stage, 1, 0.0, "fp32"), None
    if sgd:
        del cfg["optimizer"]
        cfg["zero_allow_untested_optimizer"] = True
        groups = split_params_into_different_moe_groups_for_optimizer([{"params": list(model.parameters()),
                                                                        "name": "all"}])
        optimizer = torch.optim.SGD(groups, lr=0.1)
    try:
        engine, *_ = piper_ds.initialize(model=model, optimizer=optimizer, config=cfg)
    except ValueError as err:
        return f"ValueError: {err}"
    kind = type(engine.optimizer).__name__
    engine.destroy()
    return kind


@pytest.mark.parametrize("mode,stage,sgd,expect", [
    ("auto", 2, True, "DeepSpeedZeroOptimizer"),
    ("on", 2, True, "ValueError: piper.optimizer.fused_step is 'on' but the basic optimizer is SGD"),
    ("on", 0, False, "ValueError: piper.optimizer.fused_step is 'on' but the engine runs"),
])
def test_unsupported_setups_keep_deepspeeds_step_or_fail_loudly(mode, stage, sgd, expect):
    (got,) = run_distributed(_unsupported_worker, 1, mode, stage, sgd, timeout=240)
    assert got.startswith(expect), got


def test_config_modes_match_the_runtime():
    from typing import get_args

    from piper_ds.config import OptimizerConfig, parse_piper_config
    from piper_ds.runtime.zero_step import FUSED_STEP_MODES
    assert get_args(OptimizerConfig.model_fields["fused_step"].annotation) == FUSED_STEP_MODES
    assert parse_piper_config({}).optimizer.fused_step == "auto"
    with pytest.raises(ValueError, match="fused_step"):
        parse_piper_config({"piper": {"optimizer": {"fused_step": "yes"}}})
