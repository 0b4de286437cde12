"""Activation bytes of one transformer block: what the planner's memory model counts and what the pipeline's
stage cut weighs.

The saved tensors follow the reference model (:mod:`piper_ds.models`) and the MoE layer (:mod:`piper_ds.moe`):
attention keeps its inputs, q/k/v, output and log-sum-exp (flash/efficient attention; the ``s x s`` scores
only where math attention keeps them); an MoE block keeps its router's fp32 logits and probabilities, the
expanded expert rows and the row bookkeeping of the dispatch and combine.
"""
from __future__ import annotations

from typing import Dict

from piper_ds.system.layout import Layout
from piper_ds.system.specs import ModelSpec

#: Rows on the busiest EP rank / mean (routing skew) assumed when nothing was measured: the planner's default
#: profile and the pipeline's stage cut.
DEFAULT_LOAD_IMBALANCE = 1.15


def distinct_ranks_per_token(ep: int, k: int) -> float:
    """Expected distinct EP ranks a token's top-k experts live on, uniform routing: ep*(1-(1-1/ep)^k).

    A token is sent once per destination rank (not once per expert), so this is the rows-per-token factor of
    the dispatch. ep=1 gives 1 (the token stays local); it tends to k as ep grows.
    """
    if ep < 1 or k < 1:
        raise ValueError(f"ep ({ep}) and k ({k}) must be >= 1")
    return ep * (1.0 - (1.0 - 1.0 / ep) ** k)


def block_activations(model: ModelSpec, layout: Layout, moe: bool, *, imbalance: float = 1.0,
                      attention_saves_scores: bool = False) -> Dict[str, float]:
    """Bytes one block keeps for backward for one micro-batch ('saved') and its per-layer 'a2a' send
    buffers (alive only while the layer runs).

    ``imbalance``: rows on the busiest EP rank / mean (1 at ep = 1). ``attention_saves_scores``: attention
    keeps the ``s x s`` scores (math SDPA, e.g. on CPU).
    """
    a = 2 if layout.precision == "bf16" else 4
    b, s, d = layout.micro_batch, model.seq_len, model.d_model
    t = b * s
    hd, h, hkv = model.hd, model.n_heads, model.kv_heads
    saved = a * t * (2 * d + 2 * h * hd + 2 * hkv * hd) + 4 * b * h * s  # norm in/out, q k v, attn out, lse
    if attention_saves_scores:
        saved += 2 * a * b * h * s * s
    hid = model.n_mats  # hidden tensors kept per FFN row: SwiGLU gate, up, product; GELU pre, post
    if not moe:
        return {"saved": saved + a * t * (2 * d + hid * model.ffn_dense), "a2a": 0.0}
    k, e = model.top_k, model.num_experts
    rows_send = t * distinct_ranks_per_token(layout.ep, k)  # one row per (token, destination rank)
    rows_recv = rows_send * imbalance
    rows_exp = t * k * imbalance  # expanded to (token, expert) rows at the busiest rank
    saved += a * t * 2 * d + 8 * t * e + 12 * t * k  # norms; fp32 router logits + probs; top-k idx/weights
    saved += 8 * rows_recv * k  # row positions and weights of the expansion and the combine
    # expert input, the up projection's output (SwiGLU: gate | up; the activation is recomputed in backward,
    # piper_ds.ops.experts) and the output (for the combine's weight gradient)
    saved += a * rows_exp * (2 * d + (hid - 1) * model.d_ffn_expert)
    # The received rows and the rows back at the source are not saved: the all-to-all saves nothing and the
    # row expansions / the unweighted reduce save only their fan index (piper_ds.ops.permute); both buffers live
    # only while the layer runs ('a2a' below).
    if model.n_shared_experts:
        saved += a * t * (d + hid * model.n_shared_experts * model.d_ffn_expert)
    a2a = a * rows_send * d + 8 * rows_send * k + a * rows_recv * d  # dispatch send + combine send
    return {"saved": saved, "a2a": a2a}
