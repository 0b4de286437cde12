"""The layout-free optimizer state of a checkpoint: fp32 master weights, moments, step and optimizer-group
hyperparameters per dense parameter (by name) and per expert (by global id), under ``<tag>/piper_state/``:

* ``dense_mp_rank_<mp>.pt``: {parameter name: record} of one pipeline stage's non-expert parameters (``mp`` is
  DeepSpeed's model-parallel rank, the stage under pp > 1), written by the stage's data-parallel rank 0;
* ``expert_<layer>_<id>.pt``: {parameter name (``w_up``, ``w_down``): record of that expert's slice} for
  PiperMoE layer ``<layer>`` (its module name) and global expert ``<id>``, written by expert-data-parallel rank 0
  of the rank holding the expert.

A record is ``{"master", "moments", "step", "hyperparameters"}`` (:class:`piper_ds.runtime.optim_state.SliceState`
plus the param group's options, ``lr`` and so on). Nothing in it depends on the world, data-parallel or EP size,
so a run under another layout fills its optimizer from it (:func:`load_state`) after DeepSpeed loaded the module.
Both directions gather and scatter through :func:`piper_ds.runtime.optim_state.optimizer_state` (collectives over
the data-parallel groups: every rank of a stage calls them).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from piper_ds.runtime.expert_files import piper_moe_layers
from piper_ds.runtime.optim_state import OptimizerState, SliceState, optimizer_state

STATE_DIR = "piper_state"
_NOT_HYPERPARAMETERS = ("params", "name", "moe")  # a group's members and DeepSpeed's tags, not its options


def dense_file(mp_rank: int) -> str:
    """Path, relative to the checkpoint folder, of a stage's dense records."""
    return os.path.join(STATE_DIR, f"dense_mp_rank_{mp_rank:02d}.pt")


def expert_file(layer_name: str, expert: int) -> str:
    """Path, relative to the checkpoint folder, of one expert's records."""
    return os.path.join(STATE_DIR, f"expert_{layer_name}_{expert}.pt")


def _dense_params(engine) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """The trainable parameters of the rank's module that are not PiperMoE experts, in module order."""
    experts = {id(p) for _, _, layer in piper_moe_layers(engine) for p in layer.deepspeed_moe.experts.parameters()}
    return ((n, p) for n, p in engine.module.named_parameters() if p.requires_grad and id(p) not in experts)


def _record(state: SliceState, group: Dict[str, Any], index=slice(None)) -> Dict[str, Any]:
    cpu = lambda t: t[index].detach().cpu().clone()  # noqa: E731
    step = state.step.detach().cpu().clone() if torch.is_tensor(state.step) else state.step
    return {"master": cpu(state.master), "moments": {k: cpu(v) for k, v in state.moments.items()}, "step": step,
            "hyperparameters": {k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS}}


# ---------------------------------------------------------------------------------------------------- save
def save_state(engine, folder: str) -> None:
    """Writes the layout-free state of this stage into checkpoint ``folder`` through ``engine.checkpoint_engine``
    (so that the atomic save records the files). A collective over the ranks of the stage."""
    from deepspeed.utils import groups
    access = optimizer_state(engine.optimizer)
    engine.checkpoint_engine.makedirs(os.path.join(folder, STATE_DIR), exist_ok=True)
    dense_writer = groups._get_data_parallel_rank() == 0
    dense = {}
    for name, p in _dense_params(engine):
        state = access.get(p)  # every rank of the data-parallel group takes part
        if dense_writer:
            dense[name] = _record(state, access.param_group(p))
    if dense_writer:
        engine.checkpoint_engine.save(dense, os.path.join(folder, dense_file(engine.checkpoint_mp_rank)))
    for _, layer_name, layer in piper_moe_layers(engine):
        writer = groups._get_expert_data_parallel_rank(layer.expert_group_name) == 0
        params = list(layer.deepspeed_moe.experts.named_parameters())
        for slot, expert in enumerate(layer.placement.local_experts(layer.ep_rank)):
            # one slot at a time: gathering a whole stacked parameter would hold the fp32 master weights and both
            # moments of all its experts at once (every rank of the expert-data-parallel group joins each get)
            records = {name: _record(access.get(p, rows=(slot, slot + 1)), access.param_group(p), 0)
                       for name, p in params}
            if writer:
                engine.checkpoint_engine.save(records, os.path.join(folder, expert_file(layer_name, expert)))


# ---------------------------------------------------------------------------------------------------- load
def load_state(engine, folder: str) -> None:
    """Fills the optimizer of ``engine`` from checkpoint ``folder``'s layout-free state: every trainable parameter's
    master weights (and module values), moments and step, and every optimizer group's hyperparameters. Each
    expert slot takes the records of the global expert the layer's placement puts there. ValueError on every rank
    of the stage, before anything is written, when the saved parameters do not match this model's or the
    parameters of one optimizer group bring different hyperparameters."""
    access = optimizer_state(engine.optimizer)
    dense = engine.checkpoint_engine.load(os.path.join(folder, dense_file(engine.checkpoint_mp_rank)),
                                          map_location="cpu")
    params = list(_dense_params(engine))
    _agree_or_raise(engine, _dense_mismatch(folder, dense, params))
    items = [(p, None, dense[name]) for name, p in params]  # (parameter, rows, record)
    for _, layer_name, layer in piper_moe_layers(engine):
        named = list(layer.deepspeed_moe.experts.named_parameters())
        for slot, expert in enumerate(layer.placement.local_experts(layer.ep_rank)):
            records = engine.checkpoint_engine.load(os.path.join(folder, expert_file(layer_name, expert)),
                                                    map_location="cpu")
            items += [(p, (slot, slot + 1), records[name]) for name, p in named]
    options = _Hyperparameters(access)
    _agree_or_raise(engine, options.take_all(items))
    for p, rows, record in items:
        access.set(p, _state(record, p.device, rows is not None), rows)
    options.apply()


def _state(record: Dict[str, Any], device, rows: bool = False) -> SliceState:
    """The SliceState of a record on ``device`` (with a leading row dim for an expert slot)."""
    put = (lambda t: t.unsqueeze(0).to(device)) if rows else (lambda t: t.to(device))  # noqa: E731
    return SliceState(put(record["master"]), {k: put(v) for k, v in record["moments"].items()}, record["step"])


def _dense_mismatch(folder: str, saved: Dict[str, Any], params: List[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """Why the saved dense records do not fit ``params`` (names and shapes), or None."""
    names = {n for n, _ in params}
    missing, extra = sorted(names - set(saved)), sorted(set(saved) - names)
    if missing or extra:
        return (f"checkpoint {folder}: its parameters differ from this model's: missing from the checkpoint "
                f"{missing[:5]} ({len(missing)} in all), not in this model {extra[:5]} ({len(extra)} in all)")
    for name, p in params:
        if tuple(saved[name]["master"].shape) != tuple(p.shape):
            return (f"checkpoint {folder}: parameter {name!r} has shape {tuple(saved[name]['master'].shape)} in the "
                    f"checkpoint and {tuple(p.shape)} in this model")
    return None


def _agree_or_raise(engine, problem: Optional[str]) -> None:
    """Raises ValueError on every rank of the stage when any of them found a problem (the others would otherwise
    wait in the next collective, or load what the others refused)."""
    import deepspeed.comm as dist
    from deepspeed.utils import groups
    flag = torch.tensor([int(problem is not None)], dtype=torch.int64, device=engine.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=groups._get_data_parallel_group())
    if problem is not None:
        raise ValueError(problem)
    if int(flag):
        raise ValueError("another rank of this pipeline stage refused the checkpoint's layout-free state (see its "
                         "error)")


class _Hyperparameters:
    """The saved hyperparameters of each optimizer group, taken from its parameters' records; they must agree
    within a group, and then replace the group's options (only keys the group already has)."""

    def __init__(self, access: OptimizerState):
        self.access = access
        self.by_group: Dict[int, Tuple[Dict[str, Any], Dict[str, Any]]] = {}

    def take_all(self, items) -> Optional[str]:
        """Collects the hyperparameters of ``items`` ((parameter, rows, record)); the first disagreement or None."""
        for param, _, record in items:
            group, saved = self.access.param_group(param), record["hyperparameters"]
            known = self.by_group.setdefault(id(group), (group, saved))[1]
            if known != saved:
                return (f"parameters of one optimizer group were saved with different hyperparameters ({known} and "
                        f"{saved}): cannot restore that group's options")
        return None

    def apply(self) -> None:
        for group, saved in self.by_group.values():
            group.update({k: v for k, v in saved.items() if k in group})
