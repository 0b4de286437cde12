"""Tied embeddings under the pipeline: pp=2 on 2 gloo ranks. Under 1F1B the first stage holds the embedding
table and the last stage the LM head on its own copy of it; under DualPipeV rank 0 holds both (its two virtual
stages) on one table. One SGD step (lr 2**10, gradient = delta / lr) must move every parameter as the
unpipelined reference does, and every copy of the table by the sum of the embedding's and the head's
gradients."""
import pytest
import torch

from piper_ds.system.specs import ModelSpec
from piper_ds.testing import run_distributed

LR = 1024.0
MB = 2
GAS_OF = {"1f1b": 2, "dualpipev": 4}  # DualPipeV needs >= 2 x pp micro-batches
SPEC = ModelSpec.preset("tiny", n_layers=3, n_dense_layers=1, n_shared_experts=1, seq_len=8, vocab_size=64,
                        tie_embeddings=True)
# DualPipeV cuts 4 virtual stages: with 3 blocks one rank would hold no MoE block (refused, see the last test)
SPEC_OF = {"1f1b": SPEC, "dualpipev": SPEC.model_copy(update={"n_layers": 5})}
MOE = {"aux_loss_coef": 0.05, "kernels": "reference", "transport": "flat"}


def _batch(m):
    g = torch.Generator().manual_seed(m)
    ids = torch.randint(0, SPEC.vocab_size, (MB, SPEC.seq_len), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def _worker(rank, world_size, schedule):
    import deepspeed
    from piper_ds.pipeline.engine import initialize_pipeline
    from piper_ds.pipeline.model import PiperDualPipeVModule, PiperPipelineModule
    deepspeed.init_distributed(dist_backend="gloo")
    cls = PiperDualPipeVModule if schedule == "dualpipev" else PiperPipelineModule
    module = cls(SPEC_OF[schedule], MOE, ep_size=1, num_stages=2, micro_batch=MB, seed=7)
    gas = GAS_OF[schedule]
    config = {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": gas,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "steps_per_print": 10**6, "pipeline": {"use_reentrant": False},
              "piper": {"parallel": {"ep_size": 1, "pp_size": 2}, "topology": {"gpus_per_node": 2}}}
    engine, *_ = initialize_pipeline(model=module, optimizer=lambda ps: torch.optim.SGD(ps, lr=LR), config=config,
                                     schedule=schedule)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss = float(engine.train_batch(iter([_batch(m) for m in range(gas)])))
    grads = {n: (before[n] - p.detach()) / LR for n, p in module.named_parameters()}
    engine.destroy()
    return {"loss": loss, "grads": grads, "parts": module.parts}


def _reference(spec, gas):
    from piper_ds.pipeline.model import reference_layers, reference_loss
    layers = reference_layers(spec, MOE, seed=7)
    loss = torch.stack([reference_loss(layers, *_batch(m)) for m in range(gas)]).mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in layers.named_parameters()}


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_tied_pipeline_matches_reference(schedule):
    runs = run_distributed(_worker, 2, schedule, timeout=240)
    ref_loss, ref = _reference(SPEC_OF[schedule], GAS_OF[schedule])
    n_specs = SPEC_OF[schedule].n_layers + 3  # embedding, blocks, final norm, tied head
    assert runs[0]["parts"][-1] == n_specs and len(runs[0]["parts"]) == (5 if schedule == "dualpipev" else 3)
    seen = set()
    for rank, res in enumerate(runs):
        assert res["loss"] == pytest.approx(ref_loss, rel=1e-5), f"rank {rank}"
        for name, g in res["grads"].items():
            key = "0.weight" if name.startswith("tied_modules.") else name
            torch.testing.assert_close(g, ref[key], rtol=2e-4, atol=2e-7, msg=f"rank {rank} {name}")
            seen.add(key)
    assert seen == set(ref), f"parameters not covered: {sorted(set(ref) - seen)}"
    # 1F1B: the table sits on both stages and moved the same way on both, by the embedding's + the head's
    # gradient (checked against the reference above); DualPipeV: one table, on rank 0
    tables = [[g for n, g in res["grads"].items() if n.startswith("tied_modules.")] for res in runs]
    assert [len(t) for t in tables] == ([1, 1] if schedule == "1f1b" else [1, 0])
    if schedule == "1f1b":
        torch.testing.assert_close(tables[0][0], tables[1][0], rtol=0, atol=0)


def _too_few_blocks(rank, world_size):
    import deepspeed
    from piper_ds.pipeline.model import PiperDualPipeVModule
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        PiperDualPipeVModule(SPEC, MOE, ep_size=1, num_stages=2, micro_batch=MB, seed=7)
    except ValueError as err:
        return str(err)
    return None


def test_dualpipev_refuses_a_rank_without_moe_blocks():
    for msg in run_distributed(_too_few_blocks, 2, timeout=120):
        assert msg is not None and "pipeline ranks without MoE layers" in msg and "[0, 1, 1, 0]" in msg, msg
