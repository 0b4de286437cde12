"""Shared pieces of the expert-migration and layout-free checkpoint tests (imported by the test modules and, in
the spawned ranks, by their workers): the tiny model's ds_config, an engine per layout, training on a global
batch that does not depend on the world size, and the whole training state keyed by parameter name and global
expert id."""
from typing import Any, Dict, Optional, Tuple

import torch

#: Global batch of every step: sequences, each rank takes GLOBAL_BATCH / world of them.
GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 256
MODEL = {"preset": "tiny", "n_layers": 3, "n_dense_layers": 1, "n_shared_experts": 1, "seq_len": SEQ}


def ds_config(world: int, ep: int, stage: int, bf16: bool = False, fp32_grads: bool = False, clip: float = 0.0,
              aux: float = 0.0, model: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """fp32 (or bf16; ``fp32_grads``: accumulate gradients in fp32) AdamW with a warm-up schedule; router aux loss
    off by default (it depends on which tokens share a rank, so it would change with the world size). ``model``
    replaces fields of :data:`MODEL`."""
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
           "steps_per_print": 10**6, "gradient_clipping": clip, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3,
                                                         "warmup_num_steps": 4}},
           "piper": {"model": {**MODEL, **(model or {})}, "moe": {"kernels": "reference", "aux_loss_coef": aux, "transport": "flat"},
                     "parallel": {"ep_size": ep}, "runtime": {"heartbeat": False}}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if fp32_grads:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def engine(world: int, ep: int, stage: int, seed: int = 0, **options):
    """(engine, model) of the tiny model at ``ep`` under ``ds_config(world, ep, stage, **options)``."""
    import piper_ds
    from piper_ds.config import parse_piper_config
    from piper_ds.models import build_model
    cfg = ds_config(world, ep, stage, **options)
    piper = parse_piper_config(cfg)
    model = build_model(piper.model, piper.moe_for_model(), ep_size=ep, seed=seed)
    eng, _, _, _ = piper_ds.initialize(model=model, config=cfg)
    return eng, model


def batch(step: int, rank: int, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step ``step``'s global batch."""
    gen = torch.Generator().manual_seed(1000 + step)
    windows = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    per = GLOBAL_BATCH // world
    mine = windows[rank * per:(rank + 1) * per]
    return mine[:, :-1], mine[:, 1:]


def train(eng, model, start: int, stop: int, rank: int, world: int, at_step=None) -> list:
    """Optimizer steps ``start`` .. ``stop - 1``; returns the loss of each, averaged over the global batch.
    ``at_step(step)`` runs after the optimizer step of ``step``."""
    import deepspeed.comm as dist
    losses = []
    for step in range(start, stop):
        x, y = batch(step, rank, world)
        logits, aux = eng(x)
        loss = model.loss(logits, y) + aux
        eng.backward(loss)
        eng.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
        if at_step is not None:
            at_step(step)
    return losses


def training_state(eng) -> Dict[str, Any]:
    """Every parameter and its optimizer state on this rank, keyed by name; expert parameters per global expert
    id (``<layer>.<param>#<id>``): {key: (module value, master, moments, step)}. A collective."""
    from piper_ds.moe import PiperMoE
    from piper_ds.runtime.optim_state import optimizer_state, step_value
    access = optimizer_state(eng.optimizer)
    experts = {id(p): (name, m) for name, m in eng.module.named_modules() if isinstance(m, PiperMoE)
               for p in m.deepspeed_moe.experts.parameters()}
    out = {}
    for name, p in eng.module.named_parameters():
        s = access.get(p)
        if id(p) not in experts:
            out[name] = (p.detach().clone(), s.master, s.moments, step_value(s.step))
            continue
        _, layer = experts[id(p)]
        for slot, e in enumerate(layer.placement.local_experts(layer.ep_rank)):
            out[f"{name}#{e}"] = (p.detach()[slot].clone(), s.master[slot], {k: v[slot] for k, v in s.moments.items()},
                                  step_value(s.step))
    return out
