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
    from piper_ds.planner.specs import ModelSpec

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
