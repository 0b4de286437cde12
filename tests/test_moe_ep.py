"""EP invariance: ep=1 in one process and ep=2 / ep=4 on gloo give the same outputs and gradients.

Each rank owns its own tokens. The reference runs the same global weights at ep=1 over every rank's tokens
one chunk at a time (routing, capacity and aux loss are per chunk), summing the chunks' losses.
"""
import pytest
import torch
import torch.distributed as dist

from piper_ds.moe import PiperMoE
from piper_ds.testing import run_distributed

D, F, E = 12, 20, 8

CASES = {
    "softmax-top2-swiglu-shared": dict(config=dict(top_k=2, n_shared_experts=1, aux_loss_coef=0.01),
                                       tokens=[9, 7, 11, 5], skew=False),
    # every token wants experts 0 and 1 (rank 0): other ranks get no rows, rank 1 has no tokens at all
    "skewed-sigmoid-groups-gelu": dict(config=dict(top_k=3, score_func="sigmoid", n_groups=4, topk_groups=2,
                                                   activation="gelu", routed_scaling_factor=2.0, z_loss_coef=1e-3),
                                       tokens=[10, 0, 6, 8], skew=True),
    "capacity-1.0-top4": dict(config=dict(top_k=4, capacity_factor=1.0, n_shared_experts=2),
                              tokens=[16, 12, 9, 13], skew=False),
    # the built-in planning and row movement (piper_ds.moe.rows) instead of piper_ds.ops
    "reference-kernels-top3": dict(config=dict(top_k=3, kernels="reference", n_shared_experts=1),
                                   tokens=[7, 12, 0, 9], skew=False),
    # the overlapped dispatch without overlap (one chunk), and with more chunks than some ranks have tokens
    "one-chunk-top2": dict(config=dict(top_k=2, overlap_chunks=1), tokens=[9, 4, 6, 3], skew=False),
    "five-chunks-top3": dict(config=dict(top_k=3, overlap_chunks=5, n_shared_experts=1), tokens=[3, 0, 11, 2],
                             skew=False),
    "five-chunks-reference-skewed": dict(config=dict(top_k=2, overlap_chunks=5, kernels="reference"),
                                         tokens=[6, 2, 0, 7], skew=True),
}


def global_weights(case: str, config):
    gen = torch.Generator().manual_seed(list(CASES).index(case))
    swiglu = config.get("activation", "swiglu") == "swiglu"
    w = {"w1": torch.randn(E, D, F, generator=gen) * 0.3, "w2": torch.randn(E, F, D, generator=gen) * 0.3}
    if swiglu:
        w["w3"] = torch.randn(E, D, F, generator=gen) * 0.3
    router = torch.randn(E, D, generator=gen)
    if CASES[case]["skew"]:
        router[:2, 0] += 40.0  # feature 0 is always large: experts 0 and 1 win every token
    shared = None
    if config.get("n_shared_experts"):
        torch.manual_seed(7)
        shared = PiperMoE(D, E, F, config=config).shared_mlp.state_dict()
    xs = [torch.randn(t, D, generator=gen) + (torch.tensor([3.0] + [0.0] * (D - 1)) if CASES[case]["skew"] else 0)
          for t in CASES[case]["tokens"]]
    gs = [torch.randn(t, D, generator=gen) for t in CASES[case]["tokens"]]
    return w, router, shared, xs, gs


def build(case: str, ep_size: int, rank: int, group=None):
    config = CASES[case]["config"]
    w, router, shared, xs, gs = global_weights(case, config)
    layer = PiperMoE(D, E, F, ep_size=ep_size, config=config)
    if group is not None:
        layer.bind_ep_group(group)
    with torch.no_grad():
        ids = layer.placement.local_experts(rank)
        for name, full in w.items():
            getattr(layer.deepspeed_moe.experts, name).copy_(full[ids])
        layer.deepspeed_moe.gate.wg.weight.copy_(router)
        if shared is not None:
            layer.shared_mlp.load_state_dict(shared)
    return layer, xs, gs


def grads_of(layer, x):
    out = {"x": x.grad, "router": layer.deepspeed_moe.gate.wg.weight.grad}
    for name, p in layer.deepspeed_moe.experts.named_parameters():
        out[name] = p.grad
    if layer.shared_mlp is not None:
        for name, p in layer.shared_mlp.named_parameters():
            out["shared." + name] = p.grad
    return out


def ep_worker(rank, world_size):
    results = {}
    for case in CASES:
        layer, xs, gs = build(case, world_size, rank, dist.group.WORLD)
        x = xs[rank].clone().requires_grad_(True)
        y, l_aux, _ = layer(x)
        ((y * gs[rank]).sum() + l_aux).backward()
        grads = grads_of(layer, x)
        for name in list(grads):  # dense parameters: every rank holds a partial sum of the gradient
            if name == "router" or name.startswith("shared."):
                dist.all_reduce(grads[name])
        aux = l_aux.detach().clone()
        dist.all_reduce(aux)
        results[case] = dict(y=y.detach(), aux=aux, grads=grads, local=layer.placement.local_experts(rank),
                             dropped=layer.last_stats["dropped"].item())
    return results


def reference(case):
    layer, xs, gs = build(case, 1, 0)
    total_aux, ys, xgrads, dropped = 0.0, [], [], 0
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_(True)
        y, l_aux, _ = layer(x)
        ((y * g).sum() + l_aux).backward()
        ys.append(y.detach())
        xgrads.append(x.grad)
        total_aux += l_aux.detach()
        dropped += layer.last_stats["dropped"].item()
    grads = grads_of(layer, xs[0])
    return ys, xgrads, total_aux, grads, dropped


@pytest.mark.parametrize("world_size", [2, 4])
def test_ep_invariance(world_size):
    results = run_distributed(ep_worker, world_size, timeout=240)
    for case in CASES:
        ref_y, ref_xg, ref_aux, ref_grads, ref_dropped = reference(case)
        n = len(CASES[case]["tokens"])
        if world_size < n:  # fewer ranks than chunks: compare the chunks the ranks own
            ref_y, ref_xg = ref_y[:world_size], ref_xg[:world_size]
            ref_aux, ref_grads, ref_dropped = _partial_reference(case, world_size)
        tol = dict(rtol=1e-5, atol=1e-5)
        for r, by_case in enumerate(results):
            res = by_case[case]
            torch.testing.assert_close(res["y"], ref_y[r], **tol, msg=f"{case}: output rank {r}")
            torch.testing.assert_close(res["grads"]["x"], ref_xg[r], **tol, msg=f"{case}: input grad rank {r}")
            torch.testing.assert_close(res["aux"], ref_aux, **tol)
            for name, g in res["grads"].items():
                if name == "x":
                    continue
                want = ref_grads[name][res["local"]] if name in ("w_up", "w_down") else ref_grads[name]
                torch.testing.assert_close(g, want, **tol, msg=f"{case}: grad {name} rank {r}")
        assert sum(by_case[case]["dropped"] for by_case in results) == ref_dropped
        if CASES[case]["config"].get("capacity_factor"):
            assert ref_dropped > 0, "the capacity case should drop something"


def _partial_reference(case, world_size):
    """Reference over the first ``world_size`` chunks only."""
    layer, xs, gs = build(case, 1, 0)
    total_aux, dropped = 0.0, 0
    for x, g in zip(xs[:world_size], gs[:world_size]):
        x = x.clone().requires_grad_(True)
        y, l_aux, _ = layer(x)
        ((y * g).sum() + l_aux).backward()
        total_aux += l_aux.detach()
        dropped += layer.last_stats["dropped"].item()
    return total_aux, grads_of(layer, xs[0]), dropped
