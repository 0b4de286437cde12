"""A DeepSpeed engine step with PiperMoE at ep=2 moves every weight exactly as ep=1 does (ZeRO-1 and -2).

At ep=2 on two ranks the expert-data-parallel group is one rank, so expert gradients must not be averaged
across ranks that hold different experts; dense gradients are averaged over both ranks either way.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from piper_ds.moe import PiperMoE
from piper_ds.testing import run_distributed

D, F, E = 16, 24, 4


class TinyMoEModel(nn.Module):
    def __init__(self, ep_size):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = PiperMoE(D, E, F, ep_size=ep_size, top_k=2, n_shared_experts=1, aux_loss_coef=0.01)

    def forward(self, x):
        y, aux, _ = self.moe(torch.tanh(self.inp(x)))
        return y.square().mean() + aux


def _train(ep_size, stage, rank, steps=2):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    torch.manual_seed(0)
    model = TinyMoEModel(ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer([{"params": list(model.parameters()),
                                                                     "name": "all"}])
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**6}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    gen = torch.Generator().manual_seed(100 + rank)  # every rank trains on its own tokens
    losses = []
    for _ in range(steps):
        loss = engine(torch.randn(4, 6, D, generator=gen))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    experts = model.moe.deepspeed_moe.experts
    full = {}
    for name, p in experts.named_parameters():
        parts = [torch.empty_like(p.data) for _ in range(ep_size)]
        dist.all_gather(parts, p.data.contiguous(), group=model.moe.deepspeed_moe.ep_group) if ep_size > 1 \
            else parts.__setitem__(0, p.data.clone())
        full[name] = torch.cat(parts)
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" not in n}
    engine.destroy()
    return dict(losses=losses, experts=full, dense=dense)


def engine_worker(rank, world_size, stage):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    return {ep: _train(ep, stage, rank) for ep in (1, 2)}


@pytest.mark.parametrize("stage", [1, 2])
def test_engine_step_ep2_equals_ep1(stage):
    results = run_distributed(engine_worker, 2, stage, timeout=300)
    for rank, res in enumerate(results):
        ep1, ep2 = res[1], res[2]
        assert ep1["losses"] == pytest.approx(ep2["losses"], rel=1e-5, abs=1e-6)
        for name in ep1["experts"]:
            torch.testing.assert_close(ep2["experts"][name], ep1["experts"][name], rtol=1e-5, atol=1e-6,
                                       msg=f"expert {name}, ZeRO-{stage}, rank {rank}")
        for name in ep1["dense"]:
            torch.testing.assert_close(ep2["dense"][name], ep1["dense"][name], rtol=1e-5, atol=1e-6,
                                       msg=f"dense {name}, ZeRO-{stage}, rank {rank}")
    # the weights did move, and the ranks agree on the dense ones
    assert results[0][1]["losses"][0] != results[0][1]["losses"][1]
    for name in results[0][2]["dense"]:
        torch.testing.assert_close(results[0][2]["dense"][name], results[1][2]["dense"][name])
