"""The pipeline's stage cut: one cost per layer, cut into stages by DeepSpeed's balanced partition.

:class:`piper_ds.pipeline.model.PiperPipelineModule` cuts its layers with :func:`stage_bounds`, and the
planner predicts every stage's memory and time from the same bounds, so the layout it predicts is the one the
runtime builds. The layers are the pipeline module's layer specs: ``[embedding, block 0, ..., block L-1,
head]``, or with tied embeddings ``[embedding, blocks..., final norm, tied head]``.

A layer's cost is its share of the model's training FLOPs plus its share of the memory it pins (16 bytes per
parameter held, routed experts divided by ep, and the activations one micro-batch saves), so a stage's cost
is dimensionless and the costs of all layers sum to 2.
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

from piper_ds.system.activations import DEFAULT_LOAD_IMBALANCE, block_activations
from piper_ds.system.deepspeed_rules import partition_balanced
from piper_ds.system.layout import Layout
from piper_ds.system.specs import ModelSpec

#: Bytes of model state per parameter a layer pins in the cost: bf16 weight and gradient, fp32 master and
#: the two Adam moments.
STATE_BYTES_PER_PARAM = 16.0


def layer_costs(spec: ModelSpec, micro_batch: int, ep: int) -> List[float]:
    """Cost of every layer spec ``[embedding, blocks..., head]`` (see the module docstring)."""
    layout = Layout(dp=ep, ep=ep, micro_batch=micro_batch)
    imbalance = 1.0 if ep == 1 else DEFAULT_LOAD_IMBALANCE
    tok = micro_batch * spec.seq_len
    attn = spec.attention_params_per_layer() + 2 * spec.d_model
    flops, mem = [0.0], [STATE_BYTES_PER_PARAM * spec.vocab_size * spec.d_model]
    for i in range(spec.n_layers):
        moe = i >= spec.n_dense_layers
        active = attn + (spec.num_experts * spec.d_model + spec.shared_params_per_layer()
                         + spec.top_k * spec.expert_params() if moe else spec.ffn_params(spec.ffn_dense))
        held = attn + (spec.num_experts * spec.d_model + spec.shared_params_per_layer()
                       + spec.num_experts // ep * spec.expert_params() if moe else spec.ffn_params(spec.ffn_dense))
        flops.append(6.0 * tok * (active + spec.seq_len * spec.d_attn))
        saved = block_activations(spec, layout, moe, imbalance=imbalance)["saved"]
        mem.append(STATE_BYTES_PER_PARAM * held + saved)
    head_mem = 4.0 * tok * spec.vocab_size  # fp32 logits
    table = STATE_BYTES_PER_PARAM * spec.vocab_size * spec.d_model
    if spec.tie_embeddings:  # final norm, then the head on its own copy of the table
        flops += [0.0, 6.0 * tok * spec.vocab_size * spec.d_model]
        mem += [STATE_BYTES_PER_PARAM * spec.d_model, table + head_mem]
    else:
        flops.append(6.0 * tok * spec.vocab_size * spec.d_model)
        mem.append(table + STATE_BYTES_PER_PARAM * spec.d_model + head_mem)
    sf, sm = sum(flops), sum(mem)
    return [f / sf + m / sm for f, m in zip(flops, mem)]


@functools.lru_cache(maxsize=4096)
def stage_bounds(spec: ModelSpec, micro_batch: int, ep: int, num_stages: int) -> Tuple[int, ...]:
    """``num_stages + 1`` bounds into the layer specs: stage ``s`` runs layer specs ``[b[s], b[s + 1])``
    (:func:`~piper_ds.system.deepspeed_rules.partition_balanced` of :func:`layer_costs`). Under DualPipeV
    ``num_stages`` counts the virtual stages (2 pp)."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    return tuple(partition_balanced(layer_costs(spec, micro_batch, ep), num_stages))


def blocks_between(spec: ModelSpec, start: int, stop: int) -> range:
    """Transformer blocks among layer specs ``[start, stop)`` (layer spec ``j`` in 1..L is block ``j - 1``)."""
    first = max(start, 1) - 1
    return range(first, max(min(stop, spec.n_layers + 1) - 1, first))


def stage_blocks(spec: ModelSpec, micro_batch: int, ep: int, num_stages: int) -> List[range]:
    """Transformer blocks of every stage of the cut :func:`stage_bounds`."""
    b = stage_bounds(spec, micro_batch, ep, num_stages)
    return [blocks_between(spec, b[s], b[s + 1]) for s in range(num_stages)]


def rank_stages(pp: int, virtual_stages: int, rank: int) -> List[int]:
    """Stages pipeline rank ``rank`` runs, in phase order: ``[rank]``, or under DualPipeV (two virtual stages
    per rank) ``[rank, 2 pp - 1 - rank]``."""
    if virtual_stages not in (1, 2) or not 0 <= rank < pp:
        raise ValueError(f"rank ({rank}) must be in [0, pp={pp}) and virtual_stages ({virtual_stages}) 1 or 2")
    return [rank] if virtual_stages == 1 else [rank, 2 * pp - 1 - rank]


def moe_blocks_per_rank(spec: ModelSpec, micro_batch: int, ep: int, pp: int, virtual_stages: int) -> List[int]:
    """MoE blocks each pipeline rank holds under the cut; the pipeline needs at least one on every rank."""
    parts = stage_blocks(spec, micro_batch, ep, pp * virtual_stages)
    return [sum(1 for s in rank_stages(pp, virtual_stages, r) for b in parts[s] if b >= spec.n_dense_layers)
            for r in range(pp)]


__all__: Sequence[str] = ["STATE_BYTES_PER_PARAM", "layer_costs", "stage_bounds", "blocks_between", "stage_blocks",
                          "rank_stages", "moe_blocks_per_rank"]
