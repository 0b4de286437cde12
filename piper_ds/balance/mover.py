"""Expert migration's mover: swaps experts between the EP ranks of a layer, with their optimizer state.

:func:`migrate_experts` is called at an optimizer-step boundary by every rank of the engine (of the pipeline
stage under pp > 1: each stage holds its own layers) with the same ``moves``. For each swapped pair (a, b) of
global expert ids of one layer, expert a moves into b's (rank, slot) and b into a's:

1. each rank that holds a or b gathers that slot's fp32 master weights and optimizer moments
   (:mod:`piper_ds.runtime.optim_state`; a collective over the expert-data-parallel group when ZeRO partitions
   them, local under ZeRO-0);
2. the two EP ranks exchange them point to point inside the EP group (every expert-data-parallel replica of
   the pair does the same exchange between its own two ranks);
3. each rank writes what it received into its slot: master weights, moments, and the module parameter (the
   bf16/fp32 copy the forward reads, cast from the master as DeepSpeed does after every step), each rank its own
   piece of a partitioned state;
4. every rank rewrites the layer's :class:`~piper_ds.moe.placement.ExpertPlacement` in place, so the
   dispatcher (and anything else holding the layer's placement) routes by the new map from the next forward.

The step count belongs to a whole parameter (to its flat optimizer group under ZeRO), not to a slot; the two
experts of a pair are slots of the same parameter on two ranks and have taken the same steps, which the mover
checks (RuntimeError otherwise) rather than moves.
"""
from __future__ import annotations

import hashlib
import operator
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from piper_ds.moe import PiperMoE
from piper_ds.runtime.optim_state import OptimizerState, SliceState, optimizer_state, step_value


@dataclass
class MigrationReport:
    """What one :func:`migrate_experts` call did on this rank.

    ``experts_moved``: experts that changed rank, over all layers (2 per swap); ``bytes_sent``: bytes this rank
    sent to other ranks; ``seconds``: wall time of the call on this rank."""

    experts_moved: int
    bytes_sent: int
    seconds: float


def migrate_experts(engine, moves: Mapping[int, Sequence[Tuple[int, int]]]) -> MigrationReport:
    """Swaps experts between EP ranks (module weights, fp32 master weights, optimizer moments) and rewrites the
    placements. A collective: every rank of ``engine`` (of its pipeline stage) calls it with the same ``moves``.

    ``engine``: a PiperEngine or PiperPipelineEngine, after ``engine.step()`` (no gradient waiting for an optimizer
    step; RuntimeError otherwise). ``moves[i]``: pairs (a, b) of global expert ids to swap in
    ``engine.piper_moe_layers[i]``; a and b must live on different EP ranks, each expert in at most one pair per
    layer (ValueError naming the values otherwise, also for an unknown layer index or an id out of range).
    Empty ``moves`` change nothing. ValueError on every rank when the ranks were given different moves.
    """
    start = time.perf_counter()
    plan = _validated(engine, moves)
    _check_agreement(engine, plan)
    if not plan:
        return MigrationReport(0, 0, time.perf_counter() - start)
    access = optimizer_state(engine.optimizer)
    sent = sum(_swap_layer(engine.piper_moe_layers[i], pairs, access) for i, pairs in plan.items())
    moved = 2 * sum(len(pairs) for pairs in plan.values())
    return MigrationReport(moved, sent, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ checks
def _validated(engine, moves) -> Dict[int, List[Tuple[int, int]]]:
    """``moves`` as {layer index: [(a, b), ...]} in layer order, empty layers left out; ValueError/TypeError
    naming what is wrong."""
    if not isinstance(moves, Mapping):
        raise TypeError(f"moves must map a layer index to pairs of expert ids, got {type(moves).__name__}")
    layers = engine.piper_moe_layers
    plan, seen = {}, set()
    for key in moves:
        index = _layer_index(key, len(layers))
        if index in seen:
            raise ValueError(f"moves names MoE layer {index} twice")
        seen.add(index)
        layer = layers[index]
        if not isinstance(layer, PiperMoE):
            raise TypeError(f"MoE layer {index} is a {type(layer).__name__}; only PiperMoE layers can migrate experts")
        pairs = [_pair(index, pair) for pair in moves[key]]
        layer.placement.swapped(pairs)  # ids in range, each expert in one pair at most (ValueError)
        for a, b in pairs:
            ra, rb = int(layer.placement.rank_of[a]), int(layer.placement.rank_of[b])
            if ra == rb:
                raise ValueError(f"MoE layer {index}: experts {a} and {b} both live on EP rank {ra}; a swap moves "
                                 "experts between different EP ranks")
        if pairs:
            plan[index] = pairs
    return dict(sorted(plan.items()))


def _layer_index(key, count: int) -> int:
    try:
        index = None if isinstance(key, bool) else operator.index(key)
    except TypeError:
        index = None
    if index is None or not 0 <= index < count:
        raise ValueError(f"moves names MoE layer {key!r}, but the engine has {count} MoE layers (indices "
                         f"0..{count - 1} of engine.piper_moe_layers)")
    return index


def _pair(index: int, pair) -> Tuple[int, int]:
    """(a, b) as Python ints; integer-like ids (NumPy, 0-dim torch) are taken, bools and anything else refused."""
    items = tuple(pair) if isinstance(pair, (tuple, list)) else ()
    try:
        if len(items) != 2 or any(isinstance(e, bool) for e in items):
            raise TypeError
        return operator.index(items[0]), operator.index(items[1])
    except TypeError:
        raise ValueError(f"MoE layer {index}: a move must be a pair (a, b) of global expert ids, got {pair!r}") \
            from None


def _check_agreement(engine, plan: Dict[int, List[Tuple[int, int]]]) -> None:
    """One all-reduce over the ranks of the stage: the same moves everywhere, and every rank at an optimizer-step
    boundary. Raises on every rank alike."""
    import deepspeed.comm as dist
    from deepspeed.utils import groups
    digest = int.from_bytes(hashlib.sha256(repr(sorted(plan.items())).encode()).digest()[:7], "big")
    ready = int(engine.at_optimizer_step_boundary())
    device = engine.device
    flags = torch.tensor([digest, -digest, -ready], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=groups._get_data_parallel_group())
    if int(flags[0]) != -int(flags[1]):
        raise ValueError(f"migrate_experts: the ranks of this stage were given different moves (this rank: "
                         f"{plan}); every rank must call it with the same moves")
    if int(flags[2]) != -1:
        raise RuntimeError("migrate_experts runs at an optimizer-step boundary only: a rank of this stage holds "
                           "gradients that no optimizer step has used yet (call it after engine.step())")


# ------------------------------------------------------------------------------------------------ moving
def _swap_layer(layer: PiperMoE, pairs: List[Tuple[int, int]], access: OptimizerState) -> int:
    """Swaps ``pairs`` in ``layer`` (every rank of its EP groups calls it); returns the bytes this rank sent."""
    import torch.distributed as dist
    placement, me = layer.placement, layer.ep_rank
    params = [p for _, p in layer.deepspeed_moe.experts.named_parameters()]
    jobs = []  # (tag, peer EP rank, my slot, my expert's state per parameter)
    for tag, (a, b) in enumerate(pairs):
        ranks = int(placement.rank_of[a]), int(placement.rank_of[b])
        if me not in ranks:
            continue
        mine = a if me == ranks[0] else b
        slot = int(placement.slot_of[mine])
        states = [access.get(p, rows=(slot, slot + 1)) for p in params]  # collective over expert-DP
        jobs.append((tag, ranks[1] if me == ranks[0] else ranks[0], slot, states))
    ops, inbox = [], []
    for tag, peer, _, states in jobs:
        out = _pack(states)
        inbox.append(torch.empty_like(out))
        ops += [dist.P2POp(dist.isend, out, group=layer.deepspeed_moe.ep_group, group_peer=peer, tag=tag),
                dist.P2POp(dist.irecv, inbox[-1], group=layer.deepspeed_moe.ep_group, group_peer=peer, tag=tag)]
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    for (tag, peer, slot, states), received in zip(jobs, inbox):
        for p, state, new in zip(params, states, _unpack(received, states)):
            if step_value(new.step) != step_value(state.step):
                raise RuntimeError(f"expert swap {pairs[tag]}: the optimizer step counts differ between EP ranks "
                                   f"{me} ({step_value(state.step)}) and {peer} ({step_value(new.step)})")
            access.set(p, SliceState(new.master, new.moments, state.step), rows=(slot, slot + 1))
    placement.assign(placement.swapped(pairs))
    return sum(buf.numel() for buf in inbox)  # one message out per message in, of the same size


def _pack(states: List[SliceState]) -> torch.Tensor:
    """One uint8 buffer: the step counts of the parameters (int64, -1 before the first step), then per parameter
    its master weights and moments in key order (fp32). Bytes, so that every value arrives bit for bit."""
    steps = [-1 if s.step is None else int(step_value(s.step)) for s in states]
    parts = [torch.tensor(steps, dtype=torch.int64, device=states[0].master.device).view(torch.uint8)]
    for s in states:
        parts += [t.float().contiguous().reshape(-1).view(torch.uint8)
                  for t in [s.master] + [s.moments[k] for k in sorted(s.moments)]]
    return torch.cat(parts)


def _unpack(buf: torch.Tensor, like: List[SliceState]) -> List[SliceState]:
    """Inverse of :func:`_pack` for states shaped like ``like`` (the receiver's own, of the same parameters)."""
    header = 8 * len(like)  # int64 steps first: every fp32 piece after them starts 4-byte aligned
    steps, at, out = buf[:header].view(torch.int64).tolist(), header, []
    for s, step in zip(like, steps):
        keys = sorted(s.moments)
        tensors = []
        for t in [s.master] + [s.moments[k] for k in keys]:
            tensors.append(buf[at:at + 4 * t.numel()].view(torch.float32).reshape(t.shape).clone())
            at += 4 * t.numel()
        out.append(SliceState(tensors[0], dict(zip(keys, tensors[1:])), None if step < 0 else step))
    if at != buf.numel():
        raise RuntimeError(f"expert payload has {buf.numel()} bytes, its layout {at}")
    return out
