"""The fused ZeRO step on a GPU as users run it (bf16, torch's fused AdamW, NCCL, one rank, clipping 1.0): the
reference model trains under the fused step and under DeepSpeed's step to the same losses and master weights
(to bf16 / fp32-contraction noise), with the optimizer state in torch's own format. Runs on the GPU machine
(``pytest -m gpu``)."""
import pytest
import torch

from piper_ds.testing import run_distributed

pytestmark = pytest.mark.gpu

STEPS = 4


def _train(mode: str, stage: int):
    import piper_ds
    from expert_runs import batch, ds_config
    from piper_ds.config import parse_piper_config
    from piper_ds.models import build_model
    cfg = ds_config(1, 1, stage, bf16=True)
    cfg["optimizer"]["params"]["fused"] = True
    cfg["gradient_clipping"] = 1.0
    cfg.setdefault("piper", {})["optimizer"] = {"fused_step": mode}
    piper = parse_piper_config(cfg)
    model = build_model(piper.model, piper.moe_for_model(), ep_size=1, seed=0).to("cuda")
    engine = piper_ds.initialize(model=model, config=cfg)[0]
    losses = []
    for step in range(STEPS):
        x, y = (t.to(engine.device) for t in batch(step, 0, 1))
        logits, aux = engine(x)
        loss = model.loss(logits, y) + aux
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    zero = engine.optimizer
    masters = [m.detach().cpu().clone() for m in zero.single_partition_of_fp32_groups]
    steps = [s["step"] for s in zero.optimizer.state.values()]
    out = dict(kind=type(zero).__name__, losses=losses, masters=masters,
               step_devices=[s.device.type for s in steps], step_values=[float(s) for s in steps])
    engine.destroy()
    return out


def _worker(rank, world, stage):
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl")
    torch.cuda.set_device(0)
    return {mode: _train(mode, stage) for mode in ("on", "off")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the GPU machine")
@pytest.mark.parametrize("stage", [1, 2])
def test_fused_step_trains_as_deepspeeds_on_gpu(stage):
    (res,) = run_distributed(_worker, 1, stage, timeout=600, backend="nccl")
    fused, ds = res["on"], res["off"]
    assert (fused["kind"], ds["kind"]) == ("FusedStepZeroOptimizer", "DeepSpeedZeroOptimizer")
    assert fused["step_devices"] == ds["step_devices"] == ["cuda"] * len(ds["step_devices"])  # torch's fused
    assert fused["step_values"] == ds["step_values"] == [float(STEPS)] * len(ds["step_values"])
    assert fused["losses"] == pytest.approx(ds["losses"], rel=2e-3)
    for got, want in zip(fused["masters"], ds["masters"]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
