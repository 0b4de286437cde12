"""The fused ZeRO step on a GPU as users run it (bf16, torch's fused AdamW, NCCL, one rank, clipping 1.0): the
reference model trains under the fused step and under DeepSpeed's step to the same losses and master-weight
updates, with the optimizer state in torch's own format. Element by element the two differ where Adam turns a
near-zero gradient's last-bit difference (fp32 contraction, the attention's non-deterministic backward) into a
step of up to lr, so the updates are compared as a whole, beside DeepSpeed's own run-to-run difference. Runs on the GPU machine
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
    initial = [m.detach().cpu().clone() for m in engine.optimizer.single_partition_of_fp32_groups]
    losses = []
    for step in range(STEPS):
        x, y = (t.to(engine.device) for t in batch(step, 0, 1))
        logits, aux = engine(x)
        loss = model.loss(logits, y) + aux
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    zero = engine.optimizer
    updates = [m.detach().cpu() - m0 for m, m0 in zip(zero.single_partition_of_fp32_groups, initial)]
    steps = [s["step"] for s in zero.optimizer.state.values()]
    out = dict(kind=type(zero).__name__, losses=losses, updates=updates,
               step_devices=[s.device.type for s in steps], step_values=[float(s) for s in steps])
    engine.destroy()
    return out


def _worker(rank, world, stage):
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl")
    torch.cuda.set_device(0)
    return {run: _train(run.split("_")[0], stage) for run in ("on", "off", "off_again")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the GPU machine")
@pytest.mark.parametrize("stage", [1, 2])
def test_fused_step_trains_as_deepspeeds_on_gpu(stage):
    (res,) = run_distributed(_worker, 1, stage, timeout=600, backend="nccl")
    fused, ds, ds_again = res["on"], res["off"], res["off_again"]
    assert (fused["kind"], ds["kind"]) == ("FusedStepZeroOptimizer", "DeepSpeedZeroOptimizer")
    assert fused["step_devices"] == ds["step_devices"] == ["cuda"] * len(ds["step_devices"])  # torch's fused
    assert fused["step_values"] == ds["step_values"] == [float(STEPS)] * len(ds["step_values"])
    assert fused["losses"] == pytest.approx(ds["losses"], rel=2e-3)

    def rel(a, b):
        return max(((x - y).norm() / y.norm()).item() for x, y in zip(a["updates"], b["updates"]))

    err, noise = rel(fused, ds), rel(ds_again, ds)
    print(f"stage {stage}: fused vs DeepSpeed update {err:.2e}, DeepSpeed vs itself {noise:.2e}")
    assert err < 2e-2, (err, noise)  # a wrong update rule (bias correction, decay, clipping) is off by O(1)
