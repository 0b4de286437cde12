"""Tied embeddings under the pipeline: pp=2 on 2 gloo ranks, the first stage holds the embedding table and the
last stage the LM head on its own copy of it. One SGD step (lr 2**10, gradient = delta / lr) must move every
parameter as the unpipelined reference does, and both copies of the table by the sum of the embedding's and the
head's gradients."""
import pytest
import torch

from piper_ds.planner.specs import ModelSpec
from piper_ds.testing import run_distributed

LR = 1024.0
MB, GAS = 2, 2
SPEC = ModelSpec.preset("tiny", n_layers=3, n_dense_layers=1, n_shared_experts=1, seq_len=8, vocab_size=64,
                        tie_embeddings=True)
MOE = {"aux_loss_coef": 0.05, "kernels": "reference", "transport": "flat"}


def _batch(m):
    g = torch.Generator().manual_seed(m)
    ids = torch.randint(0, SPEC.vocab_size, (MB, SPEC.seq_len), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def _worker(rank, world_size):
    import deepspeed
    from piper_ds.pipeline.engine import initialize_pipeline
    from piper_ds.pipeline.model import PiperPipelineModule
    deepspeed.init_distributed(dist_backend="gloo")
    module = PiperPipelineModule(SPEC, MOE, ep_size=1, num_stages=2, micro_batch=MB, seed=7)
    config = {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": GAS,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "steps_per_print": 10**6, "pipeline": {"use_reentrant": False},
              "piper": {"parallel": {"ep_size": 1, "pp_size": 2}, "topology": {"gpus_per_node": 2}}}
    engine, *_ = initialize_pipeline(model=module, optimizer=lambda ps: torch.optim.SGD(ps, lr=LR), config=config)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss = float(engine.train_batch(iter([_batch(m) for m in range(GAS)])))
    grads = {n: (before[n] - p.detach()) / LR for n, p in module.named_parameters()}
    engine.destroy()
    return {"loss": loss, "grads": grads, "parts": module.parts}


def _reference():
    from piper_ds.pipeline.model import reference_layers, reference_loss
    layers = reference_layers(SPEC, MOE, seed=7)
    loss = torch.stack([reference_loss(layers, *_batch(m)) for m in range(GAS)]).mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in layers.named_parameters()}


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, 2, timeout=240)


def test_tied_pipeline_matches_reference(runs):
    ref_loss, ref = _reference()
    n_specs = SPEC.n_layers + 3  # embedding, blocks, final norm, tied head
    assert runs[0]["parts"][-1] == n_specs
    seen = set()
    for rank, res in enumerate(runs):
        assert res["loss"] == pytest.approx(ref_loss, rel=1e-5), f"rank {rank}"
        for name, g in res["grads"].items():
            key = "0.weight" if name.startswith("tied_modules.") else name
            torch.testing.assert_close(g, ref[key], rtol=2e-4, atol=2e-7, msg=f"rank {rank} {name}")
            seen.add(key)
    assert seen == set(ref), f"parameters not covered: {sorted(set(ref) - seen)}"
    # the table sits on both stages and moved the same way on both: by the embedding's + the head's gradient
    tables = [next(g for n, g in res["grads"].items() if n.startswith("tied_modules.")) for res in runs]
    torch.testing.assert_close(tables[0], tables[1], rtol=0, atol=0)
