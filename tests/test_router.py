"""Router against a naive per-token reference: top-k, groups, normalisation, losses, selection bias."""
import math

import pytest
import torch

from piper_ds.moe.config import MoEConfig
from piper_ds.moe.router import TopKGateFP32
from piper_ds.ops import reference as R


def naive_route(logits, k, score_func, bias=None, n_groups=1, topk_groups=1, normalize=True, scaling=1.0,
                group_score="top2_sum"):
    """One token at a time, plain Python sorting: the slow, obvious definition."""
    T, E = logits.shape
    idx_out, w_out = [], []
    for t in range(T):
        row = logits[t].double()
        scores = torch.softmax(row, 0) if score_func == "softmax" else torch.sigmoid(row)
        sel = [scores[e].item() + (bias[e].item() if bias is not None else 0.0) for e in range(E)]
        allowed = set(range(E))
        if n_groups > 1:
            per = E // n_groups
            best_n = min(2, per) if group_score == "top2_sum" else 1
            gscore = [sum(sorted(sel[g * per:(g + 1) * per], reverse=True)[:best_n]) for g in range(n_groups)]
            best = sorted(range(n_groups), key=lambda g: -gscore[g])[:topk_groups]
            allowed = {e for g in best for e in range(g * per, (g + 1) * per)}
        chosen = sorted(allowed, key=lambda e: -sel[e])[:k]
        w = [scores[e].item() for e in chosen]
        if normalize:
            s = sum(w)
            w = [v / s for v in w]
        idx_out.append(chosen)
        w_out.append([v * scaling for v in w])
    return torch.tensor(idx_out), torch.tensor(w_out)


CASES = [
    dict(k=1, score_func="softmax", normalize=False),
    dict(k=2, score_func="softmax"),
    dict(k=6, score_func="softmax", scaling=2.5),
    dict(k=8, score_func="sigmoid", n_groups=8, topk_groups=4, scaling=2.5, bias=True),
    dict(k=3, score_func="sigmoid", n_groups=4, topk_groups=2, normalize=False),
    dict(k=16, score_func="softmax"),  # k == E
    # DeepSeek-V2's group_limited_greedy: a group scores its best expert, no renormalisation
    dict(k=3, score_func="softmax", n_groups=4, topk_groups=2, normalize=False, scaling=1.5, group_score="max"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gating_reference_matches_naive(case):
    torch.manual_seed(1)
    T, E = 37, 16 if case["k"] <= 16 else case["k"]
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 0.3 if case.pop("bias", False) else None
    out = R.gating_reference(logits, case["k"], case["score_func"], bias_E=bias,
                             n_groups=case.get("n_groups", 1), topk_groups=case.get("topk_groups", 1),
                             normalize=case.get("normalize", True), scaling=case.get("scaling", 1.0),
                             group_score=case.get("group_score", "top2_sum"))
    idx, w = naive_route(logits, case["k"], case["score_func"], bias, case.get("n_groups", 1),
                         case.get("topk_groups", 1), case.get("normalize", True), case.get("scaling", 1.0),
                         case.get("group_score", "top2_sum"))
    assert torch.equal(out.topk_idx_TK, idx)
    torch.testing.assert_close(out.topk_weights_TK, w.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.tokens_per_expert_E, torch.bincount(idx.flatten(), minlength=E))


def test_bias_changes_selection_not_weights():
    torch.manual_seed(2)
    logits = torch.randn(64, 8)
    bias = torch.zeros(8)
    bias[3] = 10.0  # expert 3 is always selected, but weighted by its own score
    out = R.gating_reference(logits, 2, "sigmoid", bias_E=bias, normalize=False)
    assert (out.topk_idx_TK == 3).any(dim=1).all()
    rows = torch.arange(64)[:, None]
    torch.testing.assert_close(out.topk_weights_TK, torch.sigmoid(logits)[rows, out.topk_idx_TK])


def test_aux_and_z_loss_match_hand_formulas():
    torch.manual_seed(3)
    T, E, k = 50, 8, 2
    logits = torch.randn(T, E)
    gate = TopKGateFP32(4, E, MoEConfig(top_k=k, aux_loss_coef=0.1, z_loss_coef=0.01))
    with torch.no_grad():
        gate.wg.weight.copy_(torch.randn(E, 4))
    x = torch.randn(T, 4)
    out = gate(x)
    logits = x @ gate.wg.weight.t()
    probs = logits.softmax(-1)
    idx = probs.topk(k, -1).indices
    f = torch.zeros(E)
    for e in idx.flatten().tolist():
        f[e] += 1.0 / (T * k)
    aux = 0.1 * E * sum(probs[:, e].mean() * f[e] for e in range(E))
    z = 0.01 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / T
    aux_loss, z_loss = gate.losses(out)
    torch.testing.assert_close(aux_loss, aux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z_loss, torch.tensor(z), rtol=1e-5, atol=1e-7)
    # the aux loss is differentiable w.r.t. the router weights
    (aux_loss + z_loss).backward()
    assert gate.wg.weight.grad.abs().sum() > 0


def test_first_choice_aux_loss():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    idx = torch.tensor([[0, 1], [1, 2]])
    # first choices: experts 0 and 1 once each -> f = [.5, .5, 0]; P = [.4, .4, .2]
    torch.testing.assert_close(R.aux_loss_reference(scores, idx, "first_choice"), torch.tensor(3 * (0.2 + 0.2)))


def test_bias_update_moves_towards_balance():
    gate = TopKGateFP32(4, 4, MoEConfig(top_k=1, bias_update_rate=0.5, aux_loss_coef=0.0))
    gate.pending_load.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    gate.update_selection_bias()
    assert gate.selection_bias.tolist() == [-0.5, 0.5, 0.0, 0.0]
    assert gate.pending_load.sum() == 0
    # with the rate at 0 nothing moves and nothing accumulates
    off = TopKGateFP32(4, 4, MoEConfig(top_k=1))
    off(torch.randn(5, 4))
    off.update_selection_bias()
    assert off.selection_bias.abs().sum() == 0 and off.pending_load.sum() == 0


def test_training_forward_accumulates_load_for_bias():
    torch.manual_seed(4)
    gate = TopKGateFP32(4, 8, MoEConfig(top_k=2, bias_update_rate=1e-3))
    out = gate(torch.randn(30, 4))
    assert torch.equal(gate.pending_load, out.tokens_per_expert_E.float())
    gate.eval()
    gate(torch.randn(30, 4))
    assert torch.equal(gate.pending_load, out.tokens_per_expert_E.float())  # eval forwards do not count


def test_capacity_drop_keeps_earliest_tokens():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0]])
    dropped = R.capacity_drop_reference(idx, 3, capacity=2)
    assert dropped.tolist() == [[0, 1], [0, 2], [-1, 1], [2, -1]]


def test_fixed_selection_bias_routes_without_updates():
    """use_selection_bias: the loaded bias selects (DeepSeek-V3's e_score_correction_bias) and never moves."""
    torch.manual_seed(3)
    cfg = MoEConfig(top_k=2, score_func="sigmoid", use_selection_bias=True, normalize_weights=False)
    gate = TopKGateFP32(8, 4, cfg)
    gate.selection_bias[1] = 10.0
    out = gate(torch.randn(16, 8))
    assert (out.topk_idx_TK == 1).any(dim=1).all()
    gate.update_selection_bias()
    assert gate.selection_bias.tolist() == [0.0, 10.0, 0.0, 0.0] and gate.pending_load.sum() == 0


@pytest.mark.parametrize("bad", [dict(topk_groups=3, n_groups=2), dict(top_k=0), dict(bogus=1),
                                 dict(group_score="mean"), dict(shared_gate=True), dict(shared_d_ffn=8)])
def test_bad_router_config(bad):
    with pytest.raises(ValueError):
        MoEConfig(**bad)


def test_group_constraints_name_values():
    with pytest.raises(ValueError, match=r"num_experts \(10\).*n_groups \(4\)"):
        MoEConfig(top_k=2, n_groups=4).validate_for(10)
    with pytest.raises(ValueError, match=r"top_k \(9\).*num_experts \(8\)"):
        MoEConfig(top_k=9).validate_for(8)


@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (37, 64), (5, 3, 11)])
def test_split_bf16x3_parts_sum_to_the_fp32_value_exactly(shape):
    from piper_ds.moe.router import split_bf16x3
    gen = torch.Generator().manual_seed(sum(shape))
    t = torch.randn(*shape, generator=gen) * torch.logspace(-30, 30, shape[-1])  # a wide exponent range
    parts = split_bf16x3(t)
    assert parts.dtype == torch.bfloat16 and parts.shape == (*shape[:-1], 3, shape[-1])
    assert torch.equal(parts.float().sum(-2), t)


@pytest.mark.gpu
@pytest.mark.parametrize("T, E, D", [(1000, 64, 256), (37, 7, 136), (0, 16, 64)])
def test_bf16_router_gradients_are_within_fp32_rounding_of_the_truth(T, E, D):
    """The bf16 path's fp32 logits and bf16 gradients against the fp64 truth: each within the worst-case error of
    an fp32 sum of its n products (n * 2**-23 of the sum of their magnitudes) plus, for the bf16 gradients, half a
    bf16 ulp (2**-8 of the value). The logits gradient is random fp32, as softmax's backward gives it."""
    from piper_ds.moe.router import router_logits
    gen = torch.Generator(device="cuda").manual_seed(T + E)
    x = torch.randn(T, D, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    w = torch.randn(E, D, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    g = torch.randn(T, E, device="cuda", generator=gen) * 1e-3
    logits = router_logits(x, w)
    logits.backward(g)
    assert logits.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.bfloat16
    xd, wd, gd = x.detach().double(), w.detach().double(), g.double()
    checks = (("logits", logits, xd @ wd.t(), xd.abs() @ wd.abs().t(), D, 0.0),
              ("grad x", x.grad, gd @ wd, gd.abs() @ wd.abs(), 3 * E, 2.0 ** -8),
              ("grad w", w.grad, gd.t() @ xd, gd.abs().t() @ xd.abs(), 3 * T, 2.0 ** -8))
    for name, got, truth, magnitude, n, rounding in checks:
        bound = n * 2.0 ** -23 * magnitude + rounding * truth.abs() + 1e-30
        assert got.shape == truth.shape, name
        assert bool(((got.double() - truth).abs() <= bound).all()), name
