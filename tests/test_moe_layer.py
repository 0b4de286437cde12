"""PiperMoE in one process: the whole-layer reference, DeepSpeed's own MoE, state dicts, bad input."""
import pytest
import torch

from piper_ds.moe import MoEConfig, PiperMoE
from piper_ds.ops import reference as R
from piper_ds.testing import assert_same_function, run_distributed


def _reference_forward(layer, x_TD):
    gate = layer.deepspeed_moe.gate
    cfg = layer.config
    g = R.gating_reference(x_TD.float() @ gate.wg.weight.float().t(), cfg.top_k, cfg.score_func,
                           n_groups=cfg.n_groups, topk_groups=cfg.topk_groups, normalize=cfg.normalize_weights,
                           scaling=cfg.routed_scaling_factor)
    e = layer.deepspeed_moe.experts
    y = R.moe_reference(x_TD, g.topk_idx_TK, g.topk_weights_TK, e.w1, e.w2, getattr(e, "w3", None))
    return y + layer.shared_mlp(x_TD) if layer.shared_mlp is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [dict(top_k=1), dict(top_k=3, activation="gelu"),
                                 dict(top_k=4, score_func="sigmoid", n_groups=4, topk_groups=2, n_shared_experts=2)])
def test_layer_matches_dense_reference(cfg, dtype):
    torch.manual_seed(0)
    layer = PiperMoE(24, 8, 40, config=cfg).to(dtype)
    x = torch.randn(2, 13, 24, dtype=dtype)
    y, l_aux, counts = layer(x)
    assert y.shape == x.shape and y.dtype == dtype and l_aux.dtype == torch.float32
    assert counts.sum() == 26 * cfg["top_k"]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, _reference_forward(layer, x.view(-1, 24)).view_as(y), **tol)


def test_gated_shared_expert_of_its_own_width():
    """Qwen2-MoE's shared expert: its own hidden size, scaled per token by sigmoid(x . w_gate); group_score
    'max' runs the PyTorch router."""
    torch.manual_seed(0)
    layer = PiperMoE(16, 8, 12, top_k=2, n_shared_experts=1, shared_d_ffn=20, shared_gate=True, n_groups=4,
                     topk_groups=2, group_score="max")
    assert layer.shared_mlp.w1.weight.shape == (20, 16) and layer.shared_gate.weight.shape == (1, 16)
    assert layer.deepspeed_moe.gate.gating_fn is None
    x = torch.randn(9, 16)
    g = R.gating_reference(x @ layer.deepspeed_moe.gate.wg.weight.t(), 2, n_groups=4, topk_groups=2,
                           group_score="max")
    e = layer.deepspeed_moe.experts
    want = R.moe_reference(x, g.topk_idx_TK, g.topk_weights_TK, e.w1, e.w2, e.w3) + \
        torch.sigmoid(x @ layer.shared_gate.weight.t()) * layer.shared_mlp(x)
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)


def test_loaded_experts_belong_to_their_ep_rank():
    """load_local_experts copies given weights of a rank's experts; binding the layer as another rank is then an
    error (a random layer would draw that rank's experts instead)."""
    layer = PiperMoE(8, 4, 6, ep_size=2, top_k=2)
    w_up, w_down = torch.randn(2, 8, 12), torch.randn(2, 6, 8)
    layer.load_local_experts(w_up, w_down, ep_rank=1)
    assert torch.equal(layer.deepspeed_moe.experts.w_up, w_up) and layer.ep_rank == 1
    with pytest.raises(ValueError, match=r"w_down: got shape \(2, 8, 6\), the layer's local experts need \(2, 6, 8\)"):
        layer.load_local_experts(w_up, w_down.transpose(1, 2))
    with pytest.raises(RuntimeError, match=r"holds the loaded experts of EP rank 1 \(\[2, 3\]\) but is bound as "
                                           r"EP rank 0"):
        run_distributed(_bind_other_rank_worker, 2)


def _bind_other_rank_worker(rank, world_size):
    import torch.distributed as dist
    layer = PiperMoE(8, 4, 6, ep_size=2, top_k=2)
    layer.load_local_experts(torch.zeros(2, 8, 12), torch.zeros(2, 6, 8), ep_rank=1)  # right on rank 1 only
    layer.bind_ep_group(dist.group.WORLD)


def test_zero_tokens():
    layer = PiperMoE(8, 4, 16, top_k=2, n_shared_experts=1)
    x = torch.randn(0, 8, requires_grad=True)
    y, l_aux, counts = layer(x)
    (y.sum() + l_aux).backward()
    assert y.shape == (0, 8) and counts.sum() == 0 and x.grad.shape == (0, 8)
    # every parameter still gets a (zero) gradient: ZeRO's reduction hooks must fire on every rank
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() == 0, name


def test_capacity_reports_dropped_fraction():
    torch.manual_seed(1)
    layer = PiperMoE(8, 4, 16, top_k=2, capacity_factor=0.5)
    layer(torch.randn(40, 8))
    st = layer.last_stats
    assert st["assignments"] == 80
    # capacity ceil(0.5 * 40 * 2 / 4) = 10 per expert: at most 40 of 80 assignments are kept
    assert st["dropped"].item() >= 40


def test_state_dict_is_per_expert_and_round_trips():
    torch.manual_seed(2)
    layer = PiperMoE(8, 4, 16, top_k=2, n_shared_experts=1)
    sd = layer.state_dict()
    expert_keys = [k for k in sd if "expert" in k]
    assert sorted(expert_keys) == sorted(f"deepspeed_moe.experts.deepspeed_experts.{i}.{w}"
                                         for i in range(4) for w in ("w1", "w2", "w3"))
    # DeepSpeed keeps every key without "expert" in the dense checkpoint: router, bias, shared FFN
    assert {"deepspeed_moe.gate.wg.weight", "deepspeed_moe.gate.selection_bias"} <= set(sd)
    other = PiperMoE(8, 4, 16, top_k=2, n_shared_experts=1)
    other.load_state_dict(sd)
    x = torch.randn(5, 8)
    torch.testing.assert_close(other(x)[0], layer(x)[0])


def test_same_seed_same_global_experts_for_any_ep():
    torch.manual_seed(3)
    full = PiperMoE(8, 8, 16, ep_size=1)
    torch.manual_seed(3)
    half = PiperMoE(8, 8, 16, ep_size=2)
    torch.testing.assert_close(half.deepspeed_moe.experts.w1, full.deepspeed_moe.experts.w1[:4])
    torch.testing.assert_close(half.deepspeed_moe.gate.wg.weight, full.deepspeed_moe.gate.wg.weight)


def test_ep_layer_refuses_to_run_before_its_group_is_bound():
    layer = PiperMoE(8, 4, 16, ep_size=2)
    with pytest.raises(ValueError, match="ep_size 2 but no EP group yet"):
        layer(torch.randn(3, 8))


def test_cuda_graph_option_is_validated():
    with pytest.raises(ValueError, match=r"cuda_graph needs ep_size 1"):
        PiperMoE(8, 4, 16, ep_size=2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph needs the fused kernels"):
        PiperMoE(8, 4, 16, cuda_graph=True, kernels="reference")
    layer = PiperMoE(8, 4, 16, cuda_graph=True)  # on CPU tensors the layer runs eagerly
    torch.testing.assert_close(layer(torch.randn(5, 8))[0].shape, torch.Size([5, 8]))


def test_swiglu_experts_hold_gate_and_up_as_one_weight():
    layer = PiperMoE(8, 4, 16, top_k=2)
    e = layer.deepspeed_moe.experts
    assert tuple(e.w_up.shape) == (4, 8, 32) and tuple(e.w_down.shape) == (4, 16, 8)
    assert torch.equal(torch.cat([e.w1, e.w3], dim=2), e.w_up) and e.w2 is e.w_down
    gelu = PiperMoE(8, 4, 16, activation="gelu").deepspeed_moe.experts
    assert tuple(gelu.w_up.shape) == (4, 8, 16) and gelu.w3 is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=6, ep_size=4), r"num_experts \(6\) must be divisible by ep_size \(4\)"),
    (dict(num_experts=4, top_k=5), r"top_k \(5\) must be between 1 and num_experts \(4\)"),
    (dict(num_experts=4, hidden_size=0), r"hidden_size must be a positive int, got 0"),
    (dict(num_experts=4, bogus=3), r"bogus"),
])
def test_bad_construction_names_values(kwargs, match):
    args = dict(hidden_size=8, num_experts=4, d_ffn=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PiperMoE(**args)


def test_wrong_hidden_size_names_values():
    layer = PiperMoE(8, 4, 16)
    with pytest.raises(ValueError, match=r"last dim 7, but the layer's hidden_size is 8"):
        layer(torch.randn(3, 7))


# --------------------------------------------------------------------------- equality with DeepSpeed's MoE
def _stock_vs_piper(rank, world_size, k):
    import deepspeed
    from deepspeed.moe.layer import MoE
    from piper_ds.moe import FeedForward
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(5)
    D, F, E = 16, 24, 4
    stock = MoE(D, FeedForward(D, F), num_experts=E, ep_size=1, k=k, drop_tokens=False, use_rts=False,
                top2_2nd_expert_sampling=False)
    stock.set_deepspeed_parallelism()
    ours = PiperMoE(D, E, F, top_k=k, normalize_weights=(k == 2), aux_loss_coef=1.0,
                    aux_loss_type="switch" if k == 1 else "first_choice")
    with torch.no_grad():
        ours.deepspeed_moe.gate.wg.weight.copy_(stock.deepspeed_moe.gate.wg.weight)
        for i, expert in enumerate(stock.deepspeed_moe.experts.deepspeed_experts):
            for name in ("w1", "w2", "w3"):
                getattr(ours.deepspeed_moe.experts, name)[i].copy_(getattr(expert, name).weight.t())
    x = torch.randn(3, 10, D)
    y_stock, aux_stock, _ = stock(x)
    y_ours, aux_ours, _ = ours(x)
    return y_stock.detach(), y_ours.detach(), aux_stock.detach(), aux_ours.detach()


@pytest.mark.parametrize("k", [1, 2])
def test_equals_deepspeed_moe_dropless(k):
    y_stock, y_ours, aux_stock, aux_ours = run_distributed(_stock_vs_piper, 1, k, timeout=120)[0]
    torch.testing.assert_close(y_ours, y_stock, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_ours, aux_stock, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_feed_forward_fused_equals_plain_and_keeps_its_keys(activation):
    """FeedForward (shared experts, dense layers) through the compiled activation op equals its plain PyTorch
    form in output and every gradient, with the same nn.Linear parameters and state-dict keys."""
    from test_ops_build import cpu_ops
    from piper_ds.moe import FeedForward
    cpu_ops()
    torch.manual_seed(3)
    fused = FeedForward(24, 20, activation, kernels="cpu")
    plain = FeedForward(24, 20, activation, kernels="reference")
    plain.load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == (["w1.weight", "w3.weight", "w2.weight"] if activation == "swiglu"
                                        else ["w1.weight", "w2.weight"])
    assert_same_function(fused, plain, torch.randn(3, 7, 24))
    with pytest.raises(ValueError, match="kernels must be"):
        FeedForward(24, 20, activation, kernels="fast")


def test_assert_same_function_catches_a_different_gradient():
    from piper_ds.moe import FeedForward
    torch.manual_seed(0)
    a, b = FeedForward(8, 6, "gelu", "reference"), FeedForward(8, 6, "gelu", "reference")
    b.load_state_dict(a.state_dict())
    assert_same_function(a, b, torch.randn(4, 8))
    with torch.no_grad():
        b.w2.weight[0, 0] += 1e-3  # a different function: the output differs
    with pytest.raises(AssertionError):
        assert_same_function(a, b, torch.randn(4, 8))
