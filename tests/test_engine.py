"""PiperEngine through piper_ds.initialize: config validation, param groups, ep=1 vs ep=2 parity with
ZeRO-0/1/2, bad configs as ValueErrors naming the values (multi-process on gloo, 2 ranks)."""
import copy
import os

import pytest
import torch

from piper_ds.config import parse_piper_config
from piper_ds.engine import build_param_groups, check_batch_sizes, check_param_groups, check_setup
from piper_ds.models import build_model
from piper_ds.testing import run_distributed

MODEL = {"preset": "tiny", "n_layers": 3, "n_dense_layers": 1, "n_shared_experts": 1, "n_kv_heads": 2,
         "seq_len": 16}


def ds_config(ep=2, stage=2, **extra):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
           "piper": {"model": dict(MODEL), "moe": {"aux_loss_coef": 0.01, "kernels": "reference"},
                     "parallel": {"ep_size": ep}}}
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------------------- no processes
def test_unknown_key_in_piper_block_is_named():
    cfg = ds_config()
    cfg["piper"]["parallel"]["ep_szie"] = 2
    with pytest.raises(ValueError, match="ep_szie"):
        parse_piper_config(cfg)
    with pytest.raises(ValueError, match="colour"):
        parse_piper_config({"piper": {"colour": "blue"}})
    with pytest.raises(ValueError, match=r"num_experts \(4\).*ep_size \(3\)"):
        parse_piper_config(ds_config(ep=3))


def test_every_piper_key_is_documented():
    import os
    from piper_ds.config import PiperConfig
    from piper_ds.moe import MoEConfig
    from piper_ds.system.specs import ModelSpec
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "training.md")).read()
    blocks = {name: f.annotation for name, f in PiperConfig.model_fields.items()}
    blocks.update(model=ModelSpec, moe=MoEConfig)
    for block, cls in blocks.items():
        section = doc.split(f"#### `piper.{block}`", 1)[1].split("####", 1)[0]
        for key in cls.model_fields:
            assert f"| `{key}` |" in section, f"piper.{block}.{key} is missing from docs/training.md"


@pytest.mark.parametrize("batch, world, message", [
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}, 2,
     r"train_batch_size \(10\) != train_micro_batch_size_per_gpu \(2\) \* gradient_accumulation_steps \(2\) "
     r"\* data-parallel world size \(2\)"),
    ({"train_batch_size": 6, "train_micro_batch_size_per_gpu": 4}, 2, r"train_batch_size \(6\)"),
    ({"train_batch_size": 5}, 2, r"train_batch_size \(5\).*world size \(2\)"),
    ({"train_micro_batch_size_per_gpu": 0}, 2, r"positive int, got 0"),
    ({"gradient_accumulation_steps": 2}, 2, "neither train_batch_size nor"),
])
def test_batch_sizes_that_do_not_multiply_out(batch, world, message):
    with pytest.raises(ValueError, match=message):
        check_batch_sizes(batch, world)


def test_batch_sizes_that_multiply_out():
    check_batch_sizes({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
                       "gradient_accumulation_steps": 2}, 4)
    check_batch_sizes({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 4)
    check_batch_sizes({"train_micro_batch_size_per_gpu": 3}, 3)


def test_setup_checks_name_the_values():
    model = build_model(MODEL, ep_size=2, seed=0)
    with pytest.raises(ValueError, match=r"ZeRO stage 3 does not support MoE.*\"stage\": 2"):
        check_setup(model, ds_config(stage=3), parse_piper_config(ds_config(stage=3)), 2)
    with pytest.raises(ValueError, match=r"ep_size \(2\) must divide the world size \(3\)"):
        check_setup(model, ds_config(), parse_piper_config(ds_config()), 3)
    with pytest.raises(ValueError, match=r"built with ep_size 2 but piper.parallel.ep_size is 1"):
        check_setup(model, ds_config(ep=1), parse_piper_config(ds_config(ep=1)), 2)
    cfg = ds_config()
    cfg["piper"]["parallel"]["pp_size"] = 2
    with pytest.raises(ValueError, match=r"pp_size \(2\)"):
        check_setup(model, cfg, parse_piper_config(cfg), 2)
    check_setup(model, ds_config(), parse_piper_config(ds_config()), 4)  # fine


def test_param_groups_cover_every_parameter_once():
    model = build_model(MODEL, ep_size=2, seed=0)
    groups = build_param_groups(model)
    assert [g["name"] for g in groups] == ["params", "ep_size_2"] and groups[1]["moe"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    bad = copy.copy(groups[0])
    bad["params"] = groups[0]["params"][1:]
    with pytest.raises(ValueError, match=r"missing \['embed.weight'\]"):
        check_param_groups(model, [bad, groups[1]])
    with pytest.raises(ValueError, match="expert parameter .* split the groups"):
        check_param_groups(model, [{"name": "all", "params": list(model.parameters())}])
    custom = build_param_groups(model, [{"params": [p for n, p in model.named_parameters() if "norm" in n],
                                         "weight_decay": 0.0},
                                        {"params": [p for n, p in model.named_parameters() if "norm" not in n]}])
    assert custom[0]["weight_decay"] == 0.0 and sum(bool(g.get("moe")) for g in custom) == 1


# ------------------------------------------------------------------------------------- multi-process
def _bad_configs_worker(rank, world):
    import piper_ds
    cases = []
    model = build_model(MODEL, ep_size=2, seed=0)
    unknown = ds_config()
    unknown["piper"]["tracking"] = {"expert_load_every": 5}
    cases.append((unknown, "expert_load_every"))
    cases.append((ds_config(stage=3), "ZeRO stage 3 does not support MoE"))
    cases.append((ds_config(train_batch_size=6), r"train_batch_size \(6\) != train_micro_batch_size_per_gpu "
                                                 r"\(2\) \* gradient_accumulation_steps \(1\)"))
    seen = []
    for cfg, pattern in cases:
        try:
            piper_ds.initialize(model=model, config=cfg)
        except ValueError as err:
            seen.append((pattern, str(err)))
        else:
            raise AssertionError(f"no error for {pattern}")
    model3 = build_model({**MODEL, "num_experts": 6}, ep_size=3, seed=0)
    cfg3 = ds_config(ep=3)
    cfg3["piper"]["model"]["num_experts"] = 6
    try:
        piper_ds.initialize(model=model3, config=cfg3)
    except ValueError as err:
        seen.append((r"ep_size \(3\) must divide the world size \(2\)", str(err)))
    piper_ds.shutdown()
    return seen


def test_initialize_rejects_bad_configs_with_values():
    import re
    for seen in run_distributed(_bad_configs_worker, 2, timeout=240):
        assert len(seen) == 4
        for pattern, message in seen:
            assert re.search(pattern, message), (pattern, message)


def _gather_experts(model):
    """Full expert weights {name: [E, ...]} in global expert order, whatever the EP layout."""
    import torch.distributed as dist
    out = {}
    for i, layer in enumerate(model.moe_layers()):
        group, ep = layer.deepspeed_moe.ep_group, layer.ep_size
        for name, p in layer.deepspeed_moe.experts.named_parameters():
            parts = [p.detach().clone()]
            if ep > 1:
                parts = [torch.empty_like(p) for _ in range(ep)]
                dist.all_gather(parts, p.detach().contiguous(), group=group)
            order = [e for r in range(ep) for e in layer.placement.local_experts(r)]
            full = torch.empty((layer.num_experts, ) + tuple(p.shape[1:]))
            full[torch.tensor(order)] = torch.cat(parts)
            out[f"{i}.{name}"] = full
    return out


def _sgd(params):
    return torch.optim.SGD(params, lr=0.3, momentum=0.5)


def _train(rank, ep, stage, optimizer="adamw", steps=3):
    """``optimizer``: 'adamw' from the ds_config, or 'sgd' passed as a callable (scale-sensitive: a gradient
    scaled by ep_size, or a clipping norm that depends on ep, changes SGD's weights but hardly Adam's)."""
    import piper_ds
    from piper_ds.data import RandomTokens
    cfg = ds_config(ep=ep, stage=stage)
    if optimizer == "sgd":
        cfg.pop("optimizer")
        cfg["zero_allow_untested_optimizer"] = True
    piper = parse_piper_config(cfg)
    model = build_model(piper.model, piper.moe_for_model(), ep_size=ep, seed=0)
    engine, _, _, _ = piper_ds.initialize(model=model, config=cfg, optimizer=_sgd if optimizer == "sgd" else None)
    data = RandomTokens(256, 16, 2, seed=11)
    losses, norms = [], []
    for step in range(steps):
        x, y = data.get("train", step, 0, rank)  # each rank trains on its own tokens
        logits, aux = engine(x)
        loss = model.loss(logits, y) + aux
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm() or -1))  # catches gradient scaling that Adam would hide
    experts = _gather_experts(model)
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." not in n}
    engine.destroy()
    return losses + norms, experts, dense


CASES = [(stage, "sgd") for stage in (0, 1, 2)] + [(2, "adamw")]


def _parity_worker(rank, world):
    return {(ep, stage, opt): _train(rank, ep, stage, opt) for stage, opt in CASES for ep in (1, 2)}


def test_ep1_vs_ep2_parity_zero012():
    """Same losses, grad norms (clipping at 1.0 is active) and full weights at ep=1 and ep=2 on 2 ranks."""
    results = run_distributed(_parity_worker, 2, timeout=300)
    for stage, opt in CASES:
        for rank, res in enumerate(results):
            (l1, x1, d1), (l2, x2, d2) = res[(1, stage, opt)], res[(2, stage, opt)]
            torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"ZeRO-{stage} rank {rank} losses, grad norms: {m}")
            for name in x1:
                # Adam divides by sqrt(v): near-zero gradients turn fp32 summation-order noise into ~1e-6..3e-5
                torch.testing.assert_close(x2[name], x1[name], rtol=1e-4, atol=3e-5 if opt == "adamw" else 1e-6,
                                           msg=lambda m: f"ZeRO-{stage} {opt} expert {name}: {m}")
            for name in d1:
                torch.testing.assert_close(d2[name], d1[name], rtol=1e-4, atol=3e-5 if opt == "adamw" else 1e-6,
                                           msg=lambda m: f"ZeRO-{stage} {opt} dense {name}: {m}")
        assert results[0][(2, stage, opt)][0] != results[1][(2, stage, opt)][0]  # ranks saw different tokens
        for name in results[0][(2, stage, opt)][1]:  # both EP ranks agree on the gathered full weights
            torch.testing.assert_close(results[0][(2, stage, opt)][1][name], results[1][(2, stage, opt)][1][name])
    # ZeRO-0 clipping uses the true global norm at ep=2 (expert squares summed over the EP group), the norm
    # ZeRO-1/2 compute; DeepSpeed's own ZeRO-0 path would average per-rank norms instead
    for res in results:
        torch.testing.assert_close(torch.tensor(res[(2, 0, "sgd")][0][3:]), torch.tensor(res[(2, 2, "sgd")][0][3:]),
                                   rtol=1e-5, atol=1e-6)


def test_initialize_mirrors_deepspeed_signature():
    import inspect

    import deepspeed
    import piper_ds
    ours, theirs = inspect.signature(piper_ds.initialize), inspect.signature(deepspeed.initialize)
    assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == \
        [(p.name, p.default, p.kind) for p in theirs.parameters.values()]


def test_throughput_rates_and_mfu():
    from piper_ds.tracking import Throughput
    t = Throughput(tokens_per_step=1000, flops_per_token=1e9, world_size=2, peak_tflops=100.0)
    r = t.rates(0.5)
    assert r == {"tokens_per_s": 2000.0, "tokens_per_s_per_gpu": 1000.0, "tflops_per_gpu": 1.0, "mfu_pct": 1.0}
    t.step_times = [9.0, 0.5, 0.4, 0.6]
    s = t.summary(warmup=1)
    assert s["median_step_time_s"] == 0.5 and s["steps_timed"] == 3 and s["mfu_pct"] == 1.0


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ds_configs")


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(CONFIGS) if n.endswith(".json")))
def test_shipped_ds_configs_have_a_valid_piper_block(name):
    import json
    with open(os.path.join(CONFIGS, name)) as f:
        parse_piper_config(json.load(f))
