"""Hugging Face MoE models converted to PiperMoE (piper_ds.integrations.hf).

Tiny random models built with transformers (2-3 layers, hidden 32, 4-8 experts, fp32, no downloads). For every
supported architecture the converted model computes the original's function: logits, loss with transformers'
load-balancing loss (padding masked), and gradients, at ep = 1 and at ep = 2 on gloo (each rank its own tokens,
against the original on the same tokens); convert -> export -> from_pretrained and load (each rank reading only
its experts) give the same logits; a training step under piper_ds.initialize at ep = 2 moves every weight as at
ep = 1; bad input is a ValueError naming the values.
"""
import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, LlamaConfig, MixtralConfig,
                          OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig)

from piper_ds.integrations.hf import ARCHITECTURES, convert, export, load
from piper_ds.testing import run_distributed

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, output_router_logits=True)
MLA = dict(COMMON, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    # the first layer dense (mlp_only_layers): only MoE blocks are converted
    "qwen3_moe": lambda: Qwen3MoeConfig(**dict(COMMON, num_hidden_layers=3), moe_intermediate_size=24, num_experts=8,
                                        num_experts_per_tok=2, intermediate_size=48, head_dim=8, norm_topk_prob=True,
                                        mlp_only_layers=[0]),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                                        shared_expert_intermediate_size=40, intermediate_size=48),
    "olmoe": lambda: OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": lambda: DeepseekV2Config(**MLA, n_shared_experts=2, topk_method="group_limited_greedy", n_group=4,
                                            topk_group=2, routed_scaling_factor=1.5),
    "deepseek_v3": lambda: DeepseekV3Config(**dict(MLA, num_hidden_layers=3), n_group=4, topk_group=2,
                                            first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5),
}
SHARED = {"qwen2_moe": "shared_expert", "deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts"}


def build_hf(arch: str):
    """The original model: same weights on every rank; DeepSeek-V3's router bias made non-zero so it selects."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: transformers' aux loss leaves these tokens out
    return ids, mask


def run(model, arch, ids, mask):
    """Forward + backward of the loss; (logits, loss, aux loss or None) detached."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    aux = out.aux_loss.detach() if ARCHITECTURES[arch].has_aux_loss else None
    return out.logits.detach(), out.loss.detach(), aux


def hf_grads(model, ids_by_block, ep_size):
    """The original's gradients by parameter name; routed experts only those of ``ids_by_block``. At ep > 1 a
    rank's experts also serve the other ranks' tokens: their gradients are the sum over the ranks."""
    grads = {n: p.grad for n, p in model.named_parameters() if ".experts." not in n}
    for name, ids in ids_by_block.items():
        experts = model.get_submodule(name).experts
        for key in ("gate_up_proj", "down_proj"):
            full = getattr(experts, key).grad.clone()
            if ep_size > 1:
                dist.all_reduce(full)
            grads[f"{name}.experts.{key}"] = full[ids]
    return grads


def converted_grads(ours, arch):
    """The converted model's gradients under the original's parameter names (local experts only)."""
    grads = {n[len("hf."):]: p.grad for n, p in ours.named_parameters() if ".moe." not in n}
    for name, block in ours.blocks().items():
        moe = block.moe
        grads[f"{name}.gate.weight"] = moe.deepspeed_moe.gate.wg.weight.grad
        experts = moe.deepspeed_moe.experts
        grads[f"{name}.experts.gate_up_proj"] = experts.w_up.grad.transpose(1, 2)
        grads[f"{name}.experts.down_proj"] = experts.w_down.grad.transpose(1, 2)
        if arch in SHARED:
            for ours_name, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                grads[f"{name}.{SHARED[arch]}.{theirs}.weight"] = getattr(moe.shared_mlp, ours_name).weight.grad
        if moe.shared_gate is not None:
            grads[f"{name}.shared_expert_gate.weight"] = moe.shared_gate.weight.grad
    return grads


def compare(arch, ep_size, seed, checkpointing=False):
    """(original's, converted's) logits, loss, aux loss and gradients on this rank's batch ``seed``; with
    ``checkpointing`` both recompute their decoder layers in backward."""
    hf = build_hf(arch)
    ours = convert(copy.deepcopy(hf), ep_size=ep_size)
    if checkpointing:
        for model in (hf, ours.hf):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in ours.moe_layers():
        if ep_size > 1:
            layer.bind_ep_group(dist.group.WORLD)
    ids, mask = batch(seed)
    local = {name: b.moe.placement.local_experts(b.moe.ep_rank) for name, b in ours.blocks().items()}
    want = (*run(hf, arch, ids, mask), hf_grads(hf, local, ep_size))
    got = (*run(ours, arch, ids, mask), converted_grads(ours, arch))
    return want, got


def assert_same(want, got, what):
    (logits_w, loss_w, aux_w, grads_w), (logits_g, loss_g, aux_g, grads_g) = want, got
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_g, logits_w, **tol, msg=f"{what}: logits")
    torch.testing.assert_close(loss_g, loss_w, **tol, msg=f"{what}: loss")
    assert (aux_g is None) == (aux_w is None), what
    if aux_w is not None:
        torch.testing.assert_close(aux_g, aux_w, **tol, msg=f"{what}: aux loss")
    assert sorted(grads_g) == sorted(grads_w), what
    for name in grads_w:
        torch.testing.assert_close(grads_g[name], grads_w[name], **tol, msg=f"{what}: gradient of {name}")


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_converted_model_computes_the_same_function_and_round_trips(arch, tmp_path):
    want, got = compare(arch, 1, seed=1)
    assert_same(want, got, arch)

    hf = build_hf(arch)
    ours = convert(copy.deepcopy(hf))
    export(ours, str(tmp_path / "export"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    ids, _ = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_recomputes_the_same_function():
    """transformers' gradient checkpointing recomputes a converted block in backward, load-balancing loss on."""
    want, got = compare("qwen2_moe", 1, seed=5, checkpointing=True)
    assert_same(want, got, "qwen2_moe, gradient checkpointing")


def ep2_worker(rank, world_size, hf_dirs, export_root):
    results = {arch: compare(arch, 2, seed=10 + rank) for arch in CONFIGS}
    loaded = {}
    for arch, path in hf_dirs.items():  # load: this rank's experts only, read from the files
        model = load(path, ep_size=2)
        for layer in model.moe_layers():
            layer.bind_ep_group(dist.group.WORLD)
        ids, _ = batch(20 + rank)
        with torch.no_grad():
            loaded[arch] = (model(input_ids=ids).logits, build_hf(arch)(input_ids=ids).logits,
                            [tuple(m.deepspeed_moe.experts.w_up.shape) for m in model.moe_layers()])
        export(model, os.path.join(export_root, arch))  # gathers the experts of both ranks by global id
    return results, loaded


def test_ep2_matches_the_original_on_each_rank_and_exports_all_experts(tmp_path):
    hf_dirs = {}
    for arch in ("mixtral", "deepseek_v3"):  # per-expert keys under two names, router bias, shared experts
        hf_dirs[arch] = str(tmp_path / arch)
        build_hf(arch).save_pretrained(hf_dirs[arch])
    results = run_distributed(ep2_worker, 2, hf_dirs, str(tmp_path / "export"), timeout=300)
    for rank, (compared, loaded) in enumerate(results):
        for arch, (want, got) in compared.items():
            assert_same(want, got, f"{arch}, ep 2, rank {rank}")
        for arch, (logits, want, shapes) in loaded.items():
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6, msg=f"load {arch}, rank {rank}")
            experts = build_hf(arch).config.num_local_experts
            assert all(s[0] == experts // 2 for s in shapes), (arch, shapes)
    ids, _ = batch(3)
    for arch in hf_dirs:
        back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / arch))
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids).logits, build_hf(arch)(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-6, msg=f"export at ep 2, {arch}")


def engine_worker(rank, world_size, out_root):
    import deepspeed
    import piper_ds
    from piper_ds.balance.mover import migrate_experts
    deepspeed.init_distributed(dist_backend="gloo")
    losses = {}
    for arch, stage in (("qwen2_moe", 2), ("deepseek_v3", 1)):
        for ep in (1, 2):
            model = convert(build_hf(arch), ep_size=ep)
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      "steps_per_print": 10**6, "piper": {"parallel": {"ep_size": ep}}}
            # SGD: the update is the gradient itself (Adam's first steps amplify rounding noise of near-zero ones)
            engine, _, _, _ = piper_ds.initialize(model=model, config=config,
                                                  optimizer=lambda groups: torch.optim.SGD(groups, lr=0.5))
            run_losses = []
            for step in range(2):
                ids, mask = batch(100 * step + rank)  # every rank trains on its own tokens
                out = engine(input_ids=ids, attention_mask=mask, labels=ids)
                engine.backward(out.loss)
                engine.step()
                run_losses.append(out.loss.item())
                if ep == 2 and step == 0:  # expert migration changes neither the next step nor the export
                    migrate_experts(engine, {i: [(0, layer.num_experts - 1)]
                                             for i, layer in enumerate(engine.piper_moe_layers)})
            losses[(arch, ep)] = run_losses
            losses[(arch, ep, "contiguous")] = [m.placement.is_contiguous() for m in engine.piper_moe_layers]
            export(engine.module, os.path.join(out_root, f"{arch}-ep{ep}"))
            engine.destroy()
    return losses


def test_training_step_at_ep2_moves_weights_as_at_ep1(tmp_path):
    """Two steps at ep 1 and at ep 2 (experts 0 and E-1 of every layer swapped between the EP ranks after the
    first): the same losses and the same exported weights, by global expert id."""
    results = run_distributed(engine_worker, 2, str(tmp_path), timeout=400)
    for arch in ("qwen2_moe", "deepseek_v3"):
        for rank, losses in enumerate(results):
            assert losses[(arch, 2)] == pytest.approx(losses[(arch, 1)], rel=1e-5), (arch, rank)
            assert not any(losses[(arch, 2, "contiguous")]) and all(losses[(arch, 1, "contiguous")]), (arch, rank)
        ep1 = load_file(str(tmp_path / f"{arch}-ep1" / "model.safetensors"))
        ep2 = load_file(str(tmp_path / f"{arch}-ep2" / "model.safetensors"))
        start = build_hf(arch).state_dict()
        assert sorted(ep1) == sorted(ep2)
        for key in ep1:
            torch.testing.assert_close(ep2[key], ep1[key], rtol=1e-5, atol=1e-6, msg=f"{arch}: {key}")
        moved = [k for k in ("lm_head.weight", "model.layers.1.mlp.gate.weight") if not torch.equal(
            ep1[k], start[k])]
        assert len(moved) == 2, f"{arch}: a step did not move {moved}"


def test_loads_fused_expert_checkpoints(tmp_path):
    """A checkpoint holding the experts as transformers' fused tensors (not per expert) loads too."""
    hf = build_hf("qwen3_moe")
    hf.config.save_pretrained(str(tmp_path))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    ours = load(str(tmp_path), ep_size=2, ep_rank=1)
    layer = ours.moe_layers()[0]
    torch.testing.assert_close(layer.deepspeed_moe.experts.w_down,
                               hf.model.layers[1].mlp.experts.down_proj.detach()[4:].transpose(1, 2))
    with torch.no_grad():
        full = load(str(tmp_path))
        ids, _ = batch(4)
        torch.testing.assert_close(full(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_a_rank_reads_only_its_own_experts(tmp_path):
    """A checkpoint without experts 0-3 loads at ep_size 2 as EP rank 1 (it never reads them); as EP rank 0 the
    missing tensor is named."""
    hf = build_hf("qwen2_moe")
    hf.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not any(f".experts.{e}." in k for e in range(4))},
              str(tmp_path / "model.safetensors"))
    rank1 = load(str(tmp_path), ep_size=2, ep_rank=1)
    for layer, name in zip(rank1.moe_layers(), ("model.layers.0.mlp", "model.layers.1.mlp")):
        torch.testing.assert_close(layer.deepspeed_moe.experts.w_up.transpose(1, 2),
                                   hf.get_submodule(name).experts.gate_up_proj.detach()[4:])
    with pytest.raises(ValueError, match=r"has no tensor 'model.layers.0.mlp.experts.0.gate_proj.weight'"):
        load(str(tmp_path), ep_size=2, ep_rank=0)


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_or_dense_models_are_refused():
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in COMMON.items()
                                                           if k != "output_router_logits"}, intermediate_size=48))
    with pytest.raises(ValueError, match=r"model_type 'llama' is not a supported MoE architecture; supported: "
                                         r"\['deepseek_v2', 'deepseek_v3', 'mixtral', 'olmoe', 'qwen2_moe', "
                                         r"'qwen3_moe'\]"):
        convert(dense)
    no_moe = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**COMMON, num_experts=8, mlp_only_layers=[0, 1]))
    with pytest.raises(ValueError, match=r"Qwen3MoeForCausalLM has no MoE blocks \(Qwen3MoeSparseMoeBlock\)"):
        convert(no_moe)
    with pytest.raises(TypeError, match="causal LM"):
        convert(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch, change, match", [
    ("mixtral", dict(router_jitter_noise=0.1), r"router_jitter_noise \(0.1\) is not supported"),
    ("olmoe", dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), r"topk_method 'noaux_tc' is not supported"),
    ("deepseek_v2", dict(mlp_bias=True), r"mlp_bias \(True\) is not supported"),
])
def test_router_options_piper_cannot_compute_are_refused(arch, change, match):
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    for key, value in change.items():
        setattr(model.config, key, value)
    with pytest.raises(ValueError, match=match):
        convert(model)


def test_ep_size_and_options_that_contradict_the_model_are_refused():
    model = build_hf("qwen2_moe")
    with pytest.raises(ValueError, match=r"8 experts per MoE layer, which ep_size \(3\) does not divide"):
        convert(model, ep_size=3)
    with pytest.raises(ValueError, match=r"top_k \(2\) contradicts the qwen2_moe model's top_k \(3\)"):
        convert(model, config={"top_k": 2})
    with pytest.raises(ValueError, match=r"ep_rank \(2\) must be an int in \[0, ep_size \(2\)\)"):
        convert(model, ep_size=2, ep_rank=2)


def test_checkpoints_missing_shards_or_experts_are_refused(tmp_path):
    hf = build_hf("olmoe")
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.mlp.experts.7.down_proj.weight"]
    os.remove(tmp_path / "sharded" / shard)
    with pytest.raises(ValueError, match=rf"names shard files that are missing: \['{shard}'\]"):
        load(str(tmp_path / "sharded"), ep_size=2, ep_rank=0)

    hf.config.save_pretrained(str(tmp_path / "no_experts"))
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("model.layers.1.mlp.experts")}
    save_file(state, str(tmp_path / "no_experts" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"has no experts for model.layers.1.mlp: neither "
                                         r"model.layers.1.mlp.experts.<e>.gate_proj.weight nor "):
        load(str(tmp_path / "no_experts"))


def test_import_piper_ds_needs_no_transformers():
    import subprocess
    import sys
    code = "import sys, piper_ds, piper_ds.moe, piper_ds.engine; assert 'transformers' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
