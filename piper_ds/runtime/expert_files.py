"""DeepSpeed's per-expert checkpoint files, keyed by the true global expert id, and the placements saved with them.

DeepSpeed (``DeepSpeedEngine._save_moe_checkpoint``) writes each rank's experts to
``layer_<l>_expert_<e>_mp_rank_<mp>_model_states.pt`` with e = ep_rank * E_local + slot: right for its
contiguous placement, wrong once experts have migrated. :func:`expert_file_redirects` tells the recording
checkpoint engine (:class:`piper_ds.runtime.checkpoint.RecordingCheckpointEngine`) which of those files holds
which expert, so each is written under its true id (file name and the ``deepspeed_experts.<e>`` keys inside).
The files then mean the same under any placement: stock DeepSpeed, which loads expert
ep_rank * E_local + slot into each slot, gets a correct model in the contiguous placement at any EP size, and
:func:`restore_placements` loads a saved non-contiguous placement back.

Names come from DeepSpeed's own ``_get_expert_ckpt_name``; DeepSpeed numbers the MoE layers (``l``) in module
order over every ``deepspeed.moe.layer.MoE`` of the rank's module (a pipeline stage's own layers).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from deepspeed.moe.layer import MoE

from piper_ds.moe import ExpertPlacement, PiperMoE
from piper_ds.moe.experts import PER_EXPERT
from piper_ds.runtime.manifest import MoELayerRecord


def piper_moe_layers(engine) -> List[Tuple[int, str, PiperMoE]]:
    """(DeepSpeed's MoE layer number, module name, layer) of every PiperMoE of this rank's module."""
    moe = [(name, m) for name, m in engine.module.named_modules() if isinstance(m, MoE)]
    return [(i, name, m) for i, (name, m) in enumerate(moe) if isinstance(m, PiperMoE)]


def has_only_piper_moe(engine) -> bool:
    """True when every MoE layer of this rank's module is a PiperMoE (stock MoE experts have no global ids)."""
    return all(isinstance(m, PiperMoE) for m in engine.module.modules() if isinstance(m, MoE))


def layer_record(layer: PiperMoE) -> MoELayerRecord:
    """What a checkpoint records of ``layer``: expert count, EP size, placement, one expert's parameter shapes."""
    rank_of, slot_of = layer.placement.as_lists()
    shapes = {name: list(p.shape[1:]) for name, p in layer.deepspeed_moe.experts.named_parameters()}
    return MoELayerRecord(num_experts=layer.num_experts, ep_size=layer.ep_size, rank_of=rank_of, slot_of=slot_of,
                          expert_shapes=shapes)


def gather_records(engine) -> Dict[str, MoELayerRecord]:
    """The records of every PiperMoE layer of the run, by module name (all pipeline stages). A collective."""
    import torch.distributed as dist
    local = {name: layer_record(layer) for _, name, layer in piper_moe_layers(engine)}
    parts: List = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: Dict[str, MoELayerRecord] = {}
    for part in parts:
        for name, record in part.items():
            if merged.setdefault(name, record) != record:
                raise ValueError(f"ranks disagree on MoE layer {name!r}: {merged[name]} vs {record}")
    return merged


def expert_file_redirects(engine, save_dir: str, tag: str) -> Dict[str, Tuple[str, int, int]]:
    """{path DeepSpeed will write for slot s of this rank: (path of the expert s really holds, DeepSpeed's id,
    the true id)} for every slot whose expert is not DeepSpeed's contiguous one. ``save_dir``/``tag`` as given to
    DeepSpeed's save_checkpoint."""
    from deepspeed.utils import groups
    redirects = {}
    for layer_id, _, layer in piper_moe_layers(engine):
        ep_rank = groups._get_expert_parallel_rank(layer.expert_group_name)
        for slot, true_id in enumerate(layer.placement.local_experts(ep_rank)):
            deepspeed_id = ep_rank * layer.num_local_experts + slot
            if deepspeed_id != true_id:
                redirects[_expert_path(engine, save_dir, tag, layer_id, deepspeed_id)] = \
                    (_expert_path(engine, save_dir, tag, layer_id, true_id), deepspeed_id, true_id)
    return redirects


def _expert_path(engine, folder: str, tag: str, layer_id: int, expert: int) -> str:
    """DeepSpeed's name of expert ``expert``'s file of MoE layer ``layer_id`` (this rank's model-parallel rank)."""
    return engine._get_expert_ckpt_name(folder, layer_id, expert, tag, checkpoint_mp_rank=engine.checkpoint_mp_rank)


def rekey_expert(state_dict: Dict[str, torch.Tensor], old: int, new: int) -> Dict[str, torch.Tensor]:
    """An expert file's state dict with ``deepspeed_experts.<old>.`` renamed ``deepspeed_experts.<new>.``."""
    before, after = f".{PER_EXPERT}.{old}.", f".{PER_EXPERT}.{new}."
    return {key.replace(before, after): value for key, value in state_dict.items()}


def restore_placements(engine, records: Dict[str, MoELayerRecord], load_dir: str, tag: str) -> None:
    """After DeepSpeed loaded the module (experts in the contiguous placement): every PiperMoE layer takes the
    placement of its record when the record has the layer's EP size, else the contiguous one; a layer whose
    placement is not contiguous then loads its experts again, each slot from the file of its true global id."""
    for layer_id, name, layer in piper_moe_layers(engine):
        record = records.get(name)
        same = record is not None and record.ep_size == layer.ep_size
        target = ExpertPlacement(layer.num_experts, layer.ep_size, *((record.rank_of, record.slot_of) if same else ()))
        layer.placement.assign(target)
        if target.is_contiguous():
            continue
        experts = layer.deepspeed_moe.experts
        for slot, expert in enumerate(target.local_experts(layer.ep_rank)):
            path = _expert_path(engine, load_dir, tag, layer_id, expert)
            marker = f".{PER_EXPERT}.{expert}."
            weights = {key.split(marker, 1)[1]: value
                       for key, value in engine.checkpoint_engine.load(path, map_location="cpu").items()
                       if marker in key}
            experts.load_expert(slot, weights)
