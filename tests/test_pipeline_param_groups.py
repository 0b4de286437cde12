"""Optimizer groups under pipeline parallelism: ZeRO all-reduces the gradient norm over the stages once per
parameter group, so every stage must build the same number of groups even when its MoE layers differ in size
(DeepSpeed cuts MoE groups at a fixed element count). Unequal counts would hang the first optimizer step."""
import pytest
import torch

from piper_ds.pipeline.engine import _chunks, moe_param_groups
from piper_ds.system.specs import ModelSpec
from piper_ds.testing import run_distributed


def _params(*sizes):
    return [torch.nn.Parameter(torch.zeros(n)) for n in sizes]


def test_chunks_greedy_then_split_to_count():
    ps = _params(4, 4, 4, 10, 1)
    greedy = _chunks(ps, 8, 4)  # a tensor above the cap is a chunk of its own
    assert [[p.numel() for p in c] for c in greedy] == [[4, 4], [4], [10], [1]]
    more = _chunks(ps, 8, 5)  # the chunk with most tensors is halved
    assert [[p.numel() for p in c] for c in more] == [[4], [4], [4], [10], [1]]
    assert [p for c in more for p in c] == ps  # order kept, each parameter once
    fewer = _chunks(ps, 8, 3)  # merged at the smallest cap (11) that needs no more than 3
    assert [[p.numel() for p in c] for c in fewer] == [[4, 4], [4], [10, 1]]
    assert [[p.numel() for p in c] for c in _chunks(ps, 8, 1)] == [[4, 4, 4, 10, 1]]


def test_chunks_bad_counts():
    ps = _params(4, 4)
    for count in (0, 3):
        with pytest.raises(ValueError, match=f"into {count} non-empty optimizer groups"):
            _chunks(ps, 100, count)


SPEC = ModelSpec.preset("tiny", n_layers=6, n_dense_layers=1, n_shared_experts=0, seq_len=8, vocab_size=64)
MB, GAS = 2, 2


def _worker(rank, world_size, cap):
    import deepspeed
    import piper_ds.pipeline.engine as pe
    from piper_ds.pipeline.engine import initialize_pipeline
    from piper_ds.pipeline.model import PiperPipelineModule
    deepspeed.init_distributed(dist_backend="gloo")
    pe.MOE_GROUP_MAX_NUMEL = cap  # small, so the stages' MoE parameters fall into different greedy counts
    module = PiperPipelineModule(SPEC, {"kernels": "reference", "transport": "flat"}, ep_size=1, num_stages=2,
                                 micro_batch=MB, partition_method="uniform")
    experts = [p for p in module.parameters() if getattr(p, "allreduce", True) is False]
    greedy, tensors = len(pe._greedy(experts, cap)), len(experts)
    config = {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": GAS,
              "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0, "steps_per_print": 10**6,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "piper": {"parallel": {"ep_size": 1, "pp_size": 2}, "topology": {"gpus_per_node": 2}}}
    engine, *_ = initialize_pipeline(model=module, config=config)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, SPEC.vocab_size, (MB, SPEC.seq_len), generator=g) for _ in range(GAS)]
    loss = float(engine.train_batch(iter([(x, torch.roll(x, -1, dims=1)) for x in ids])))
    out = {"greedy": greedy, "tensors": tensors, "groups": len(engine.optimizer.bit16_groups), "loss": loss,
           "moe_layers": len(engine.piper_moe_layers)}
    engine.destroy()
    return out


def test_stages_with_unequal_moe_layers_agree_on_group_count():
    # uniform partition of 8 layer specs (embedding, 6 blocks, head) into 2 stages: 2 and 3 MoE blocks
    res = run_distributed(_worker, 2, 3000, timeout=240)
    assert res[0]["moe_layers"] != res[1]["moe_layers"]
    assert res[0]["greedy"] != res[1]["greedy"]  # DeepSpeed's own split would have differed
    # one dense group + min(largest greedy count, fewest expert tensors) MoE groups on every stage
    expected = 1 + min(max(r["greedy"] for r in res), min(r["tensors"] for r in res))
    assert res[0]["groups"] == res[1]["groups"] == expected
    assert res[0]["loss"] == pytest.approx(res[1]["loss"]) and res[0]["loss"] > 0


def _no_moe_stage_worker(rank, world_size):
    import deepspeed
    from piper_ds.pipeline.model import PiperPipelineModule
    deepspeed.init_distributed(dist_backend="gloo")
    spec = ModelSpec.preset("tiny", n_layers=3, n_dense_layers=2, n_shared_experts=0, seq_len=8, vocab_size=64)
    try:
        PiperPipelineModule(spec, {"kernels": "reference"}, ep_size=1, num_stages=2, partition_method="uniform")
    except ValueError as err:
        return str(err)
    return None


def test_stage_without_moe_layers_is_rejected():
    msgs = run_distributed(_no_moe_stage_worker, 2, timeout=120)
    assert all(m is not None and "without MoE layers" in m and "n_dense_layers=2" in m for m in msgs), msgs


def test_moe_param_groups_single_process_cap():
    from piper_ds.moe import PiperMoE
    import deepspeed.comm as dist  # noqa: F401 - moe_param_groups imports it; no process group needed here
    layer = PiperMoE(8, 4, 16, ep_size=1, top_k=2, kernels="reference")
    groups = moe_param_groups(layer, max_group_numel=4 * 8 * 32)  # the largest expert tensor: w_up [4, 8, 2 * 16]
    moe = [g for g in groups if g.get("moe")]
    assert all(sum(p.numel() for p in g["params"]) <= 4 * 8 * 32 for g in moe)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in layer.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="max_group_numel"):
        moe_param_groups(layer, max_group_numel=0)
