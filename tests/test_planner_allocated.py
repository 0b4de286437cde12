"""Model-state bytes DeepSpeed actually allocates on each rank of a CPU tiny run (2 gloo ranks, ep=2, fp32)
equal the planner's prediction within 2%, for ZeRO-1 and 2 (the stages DeepSpeed allows with MoE and the
search uses most; ZeRO-0's rule is checked by hand in test_planner_memory).

Gradients are the larger sum of the two backwards of one accumulation (the non-boundary one, where ZeRO-0/1
hold full gradients, and the boundary one, where ZeRO-2 holds its reduced partition); optimizer states (fp32
partition copies, Adam moments) are summed after the step; tensors sharing storage count once.
"""
import pytest
import torch

from piper_ds.planner.memory import model_state_bytes
from piper_ds.testing import run_distributed

import piper_ds.models  # noqa: E402,F401  (the reference model must exist)

SPEC = dict(n_layers=3, n_dense_layers=1, n_shared_experts=1, n_kv_heads=2, seq_len=32)


def _state_bytes(rank, world, zeros):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from piper_ds.models import MoETransformer
    from piper_ds.system.specs import ModelSpec

    spec = ModelSpec.preset("tiny", **SPEC)
    out = {}
    for zero in zeros:
        torch.manual_seed(0)
        model = MoETransformer(spec, moe={"kernels": "reference"}, ep_size=2)
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
               "zero_optimization": {"stage": zero}}
        groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()),
                                                                       "name": "params"})
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
        seen = set()

        def size(t):
            if t is None or not torch.is_tensor(t) or t.numel() <= 1:
                return 0
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                return 0
            seen.add(ptr)
            return t.untyped_storage().nbytes()

        ids = torch.randint(0, spec.vocab_size, (1, spec.seq_len))
        weights = sum(size(p) for p in model.parameters())
        grads = 0
        for _ in range(2):  # the gradient peak: the larger of the non-boundary and the boundary backward
            logits, aux = engine(ids)
            engine.backward(model.loss(logits, ids) + aux)
            seen_before = set(seen)
            now = sum(size(p.grad) for p in model.parameters())
            now += size(getattr(engine.optimizer, "grads_in_partition", None))  # ZeRO-2, contiguous
            for part in getattr(engine.optimizer, "averaged_gradients", {}).values():
                now += sum(size(t) for t in (part or []))
            seen = seen_before
            grads = max(grads, now)
            engine.step()
        opt = engine.optimizer
        states = sum(size(t) for t in getattr(opt, "single_partition_of_fp32_groups", []))
        inner = getattr(opt, "optimizer", opt)
        states += sum(size(v) for st in inner.state.values() for v in st.values())
        expert = sum(p.numel() for p in model.parameters() if not getattr(p, "allreduce", True))
        dense = sum(p.numel() for p in model.parameters()) - expert
        out[zero] = dict(weights=weights, grads=grads, optimizer=states, dense=dense, expert=expert)
        engine.destroy()
    return out


def test_allocated_model_states_match_prediction():
    results = run_distributed(_state_bytes, 2, (1, 2), timeout=300)
    for rank, res in enumerate(results):
        for zero, r in res.items():
            pred = model_state_bytes(r["dense"], r["expert"], dp=2, edp=1, zero=zero, precision="fp32")
            got = r["weights"] + r["grads"] + r["optimizer"]
            assert got == pytest.approx(sum(pred.values()), rel=0.02), (rank, zero, r, pred)
            assert r["weights"] == pred["weights"] and r["optimizer"] == pytest.approx(pred["optimizer"], rel=0.02)


def _zero2_grad_buffers(rank, world):
    """ZeRO-2, ep=1 (expert-DP = world), every expert tensor its own optimizer group: per rank, the element
    count predicted for each group, and the gradient storages alive when each backward releases its buffers."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from piper_ds.models import MoETransformer
    from piper_ds.planner.memory import partition_tensor_elements
    from piper_ds.system.specs import ModelSpec

    spec = ModelSpec.preset("tiny", **SPEC)
    torch.manual_seed(0)
    model = MoETransformer(spec, moe={"kernels": "reference"}, ep_size=1)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": 2}}
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "params"}, max_group_size=1)  # one tensor per MoE group
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    opt = engine.optimizer
    alive = []
    release = opt._release_ipg_buffers

    def recording_release():  # the end of each backward's reduction: what gradient storage is alive
        storages = {}
        tensors = [opt.grads_in_partition] if opt.grads_in_partition is not None else []
        tensors += [t for ts in (getattr(opt, "all_grad_tensors", None) or {}).values() for t in (ts or [])]
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        alive.append(sorted(storages.values()))
        return release()

    opt._release_ipg_buffers = recording_release
    ids = torch.randint(0, spec.vocab_size, (1, spec.seq_len))
    for _ in range(2):
        logits, aux = engine(ids)
        engine.backward(model.loss(logits, ids) + aux)
    group_tensors = [[p.numel() for p in g] for g in opt.bit16_groups]
    predicted = sum(partition_tensor_elements(g, world)[rank] for g in group_tensors)
    partition = sum(t.numel() for t in opt.single_partition_of_fp32_groups)
    n_moe_groups = sum(opt.is_moe_param_group)
    engine.step()
    engine.destroy()
    return dict(alive=alive, predicted=predicted, partition=partition, n_moe_groups=n_moe_groups)


def test_zero2_gradient_buffer_holds_whole_tensors():
    """DeepSpeed's ZeRO-2 gradient buffer holds the whole gradient of every tensor touching the rank's partition
    (planner.memory.partition_tensor_elements, per rank exactly), and under gradient accumulation the earlier
    micro-batches' sum is a second such buffer alive in the boundary backward (the planner's 2x)."""
    results = run_distributed(_zero2_grad_buffers, 2, timeout=300)
    for rank, r in enumerate(results):
        assert r["n_moe_groups"] >= 2, r  # the case under test: MoE groups of one tensor each
        assert r["predicted"] > r["partition"], (rank, r)  # the whole-tensor excess is there to measure
        first, boundary = r["alive"]
        assert first == [r["predicted"]], (rank, r)
        assert boundary == [r["predicted"], r["predicted"]], (rank, r)
