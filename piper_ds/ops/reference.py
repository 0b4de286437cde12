"""Pure-PyTorch references: the oracle every kernel of piper_ds is tested against.

These functions are also the production fallback when a fused kernel is not built. They favour clarity over
speed, but none of them loops over tokens in Python, so they are usable on real sizes.

Shape suffixes: T tokens, D model dim, E experts, K top-k, R ranks of the expert-parallel group,
S rows sent (one per (token, destination rank) pair), N expanded rows (one per (row, local expert) pair),
L local experts, F expert hidden size, W = 2F (SwiGLU's gate | up) or F.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from piper_ds.ops.plans import RoutePlan, SendPlan


# ------------------------------------------------------------------------------------------------ gating
class GatingOutput(NamedTuple):
    """Result of routing T tokens over E experts.

    topk_idx_TK: int64 expert ids, ordered by descending selection score.
    topk_weights_TK: float32 combine weights (differentiable w.r.t. the logits).
    scores_TE: float32 router scores (softmax or sigmoid of the logits), differentiable.
    tokens_per_expert_E: int64 number of (token, k) assignments per expert.
    """

    topk_idx_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    scores_TE: torch.Tensor
    tokens_per_expert_E: torch.Tensor


def gating_reference(logits_TE: torch.Tensor,
                     top_k: int,
                     score_func: str = "softmax",
                     bias_E: Optional[torch.Tensor] = None,
                     n_groups: int = 1,
                     topk_groups: int = 1,
                     normalize: bool = True,
                     scaling: float = 1.0,
                     group_score: str = "top2_sum") -> GatingOutput:
    """Scores, optional selection bias, group-limited top-k, normalisation and scaling; all math in fp32.

    The bias (aux-loss-free balancing) changes which experts are selected, never the weights. With groups, a
    group's score is the sum of its two best biased scores (``group_score`` 'top2_sum', DeepSeek-V3; the best
    one if a group has a single expert) or its best score ('max', DeepSeek-V2); only the experts of the
    ``topk_groups`` best groups may be selected.
    """
    logits = logits_TE.float()
    T, E = logits.shape
    if score_func == "softmax":
        scores = logits.softmax(dim=-1)
    elif score_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    select = scores.detach() if bias_E is None else scores.detach() + bias_E.float()
    if n_groups > 1:
        per_group = E // n_groups
        grouped = select.view(T, n_groups, per_group)
        if group_score == "top2_sum":
            score_TG = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
        elif group_score == "max":
            score_TG = grouped.amax(dim=-1)
        else:
            raise ValueError(f"group_score must be 'top2_sum' or 'max', got {group_score!r}")
        keep_groups = score_TG.topk(topk_groups, dim=-1).indices
        group_mask = torch.zeros(T, n_groups, dtype=torch.bool, device=logits.device)
        group_mask.scatter_(1, keep_groups, True)
        select = select.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), float("-inf"))
    topk_idx = select.topk(top_k, dim=-1).indices
    weights = scores.gather(1, topk_idx)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    weights = weights * scaling
    # scatter_add, not bincount: bincount waits on the device for its output size
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device).scatter_add_(
        0, topk_idx.flatten(), torch.ones_like(topk_idx.flatten()))
    return GatingOutput(topk_idx, weights, scores, counts)


def aux_loss_reference(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, kind: str = "switch") -> torch.Tensor:
    """Load-balancing loss E * sum_e P_e * f_e (unscaled by its coefficient).

    P_e is the mean router score of expert e over the T tokens. f_e is the share of the T*K assignments that
    went to e ('switch'), or the share of first choices ('first_choice'). Dropped assignments (-1) count as
    routed: the loss is about what the router asked for.
    """
    T, E = scores_TE.shape
    if T == 0:
        return scores_TE.sum() * 0.0
    probs = scores_TE.float().mean(dim=0)
    idx = topk_idx_TK if kind == "switch" else topk_idx_TK[:, :1]
    f = torch.zeros(E, device=idx.device).scatter_add_(0, idx.flatten(), torch.ones(idx.numel(), device=idx.device))
    f = f / idx.numel()
    return E * (probs * f).sum()


def z_loss_reference(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean_t (logsumexp_e logits)^2 (ST-MoE)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def bias_update_reference(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower it for over-loaded ones."""
    load = tokens_per_expert_E.float()
    return bias_E + rate * torch.sign(load.mean() - load)


def capacity_drop_reference(topk_idx_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Marks with -1 every assignment past an expert's capacity; earlier tokens win, then lower k."""
    T, K = topk_idx_TK.shape
    flat = topk_idx_TK.reshape(-1)  # token-major: earlier tokens claim capacity first
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    starts = torch.searchsorted(sorted_e, sorted_e, right=False)
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - starts
    return torch.where(position < capacity, flat, torch.full_like(flat, -1)).view(T, K)


# ------------------------------------------------------------------------------------- dispatch planning
def send_plan_reference(topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor, expert_rank_E: torch.Tensor,
                        expert_slot_E: torch.Tensor, ep_size: int) -> SendPlan:
    """Dedups routing per destination rank: a token goes once to a rank however many of its experts live there.

    Rows are rank-major, then in token order; ``pos_TR[t, r]`` is the row of (token t, rank r), -1 if t sends
    nothing to r.
    """
    T, K = topk_idx_TK.shape
    valid = topk_idx_TK >= 0
    safe_idx = topk_idx_TK.clamp_min(0)
    dest_TK = torch.where(valid, expert_rank_E[safe_idx], torch.full_like(safe_idx, -1))
    to_rank_RT = torch.stack([(dest_TK == r).any(dim=1) for r in range(ep_size)]) if T else \
        torch.zeros(ep_size, 0, dtype=torch.bool, device=topk_idx_TK.device)
    rank_S, token_S = to_rank_RT.nonzero(as_tuple=True)  # row-major over [R, T]: rank-major, then token
    send_counts = to_rank_RT.sum(dim=1)
    here_SK = dest_TK[token_S] == rank_S[:, None]
    slots = torch.where(here_SK, expert_slot_E[safe_idx[token_S]], torch.full_like(safe_idx[token_S], -1))
    weights = topk_weights_TK[token_S] * here_SK
    pos = torch.full((T, ep_size), -1, dtype=torch.int64, device=topk_idx_TK.device)
    pos[token_S, rank_S] = torch.arange(token_S.numel(), device=pos.device)
    return SendPlan(token_S, send_counts, slots, weights, pos)


def route_plan_reference(ids_RK: torch.Tensor, num_local: int, slot_map: Optional[torch.Tensor] = None,
                         bounded: bool = False) -> RoutePlan:
    """Groups the (row, k) pairs of ``ids_RK`` by local slot, stable in (row, k) order (see :class:`RoutePlan`).

    ``ids_RK`` holds local slots, or expert ids read through ``slot_map`` [E] (entries < 0: not local); -1 is
    no pair. ``bounded``: row_N and pair_N get one entry per pair, -1 past the real rows.
    """
    slots = ids_RK if slot_map is None else torch.where(ids_RK >= 0, slot_map[ids_RK.clamp_min(0)], -1)
    flat = slots.reshape(-1)
    if flat.numel() and int(flat.max()) >= num_local:
        raise ValueError(f"route_plan: slot {int(flat.max())} >= num_local ({num_local})")
    pair = (flat >= 0).nonzero(as_tuple=True)[0]
    pair = pair[torch.argsort(flat[pair], stable=True)]
    K = ids_RK.shape[1]
    counts = torch.bincount(flat[pair], minlength=num_local)
    pos = torch.full_like(flat, -1)
    pos[pair] = torch.arange(pair.numel(), device=flat.device)
    row = pair // max(K, 1)
    if bounded:
        pad = flat.new_full((flat.numel() - pair.numel(),), -1)
        row, pair = torch.cat([row, pad]), torch.cat([pair, pad])
    return RoutePlan(row, pair, pos.view(ids_RK.shape), counts, counts.cumsum(0).to(torch.int32))


# ------------------------------------------------------------------------------------ row movement ops
def expand_rows_reference(x_RD: torch.Tensor, pos_RK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """out[pos[r, k]] = x[r] for every pos >= 0; rows no pair points at are zero. [num_rows, D]."""
    r, k = (pos_RK >= 0).nonzero(as_tuple=True)
    out = x_RD.new_zeros(num_rows, x_RD.shape[1])
    return out.index_put((pos_RK[r, k],), x_RD[r])


def reduce_rows_reference(y_ND: torch.Tensor, pos_RK: torch.Tensor,
                          weight_RK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[r] = sum over k with pos[r, k] >= 0 of weight[r, k] * y[pos[r, k]], summed in >= fp32 in k order,
    returned in y's dtype: [R, D]."""
    acc = torch.promote_types(y_ND.dtype, torch.float32)  # at least fp32; float64 stays float64
    R, K = pos_RK.shape
    anchor = y_ND.sum() * 0 + (weight_RK.sum() * 0 if weight_RK is not None else 0)  # on the graph, also for 0
    out = torch.zeros(R, y_ND.shape[1], dtype=acc, device=y_ND.device) + anchor.to(acc)
    for k in range(K):  # in k order, as the kernels sum
        valid = pos_RK[:, k] >= 0
        rows = y_ND.to(acc).index_select(0, pos_RK[:, k][valid])
        if weight_RK is not None:
            rows = rows * weight_RK[:, k][valid].to(acc)[:, None]
        out = out.index_add(0, valid.nonzero(as_tuple=True)[0], rows)
    return out.to(y_ND.dtype)


# --------------------------------------------------------------------------------------- experts
def activation_reference(h_NW: torch.Tensor, activation: str) -> torch.Tensor:
    """SwiGLU of h = gate | up halves ([N, 2F] -> [N, F]) or exact GELU ([N, F]); fp32 math, h's dtype out."""
    x = h_NW.to(torch.promote_types(h_NW.dtype, torch.float32))
    if activation == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up).to(h_NW.dtype)
    if activation == "gelu":
        return torch.nn.functional.gelu(x).to(h_NW.dtype)
    raise ValueError(f"activation must be 'swiglu' or 'gelu', got {activation!r}")


# ------------------------------------------------------------------------------------ attention
def rope_reference(x_BHSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor,
                   inverse: bool = False) -> torch.Tensor:
    """Rotary embedding, rotate-half form over the whole head dim: x = x1 | x2 (halves of Dh) at position s goes to
    x1 * cos[s] - x2 * sin[s] | x2 * cos[s] + x1 * sin[s]; ``inverse`` rotates back (sin -> -sin), which is
    also the gradient of the forward. x [B, H, S, Dh], cos/sin fp32 [S_max >= S, Dh/2]; fp32 math (fp64 for
    fp64), x's dtype out."""
    math = torch.promote_types(x_BHSD.dtype, torch.float32)
    S = x_BHSD.shape[-2]
    c, s = cos_SH[:S].to(math), sin_SH[:S].to(math)
    if inverse:
        s = -s
    x1, x2 = x_BHSD.to(math).chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x_BHSD.dtype)


# ------------------------------------------------------------------------------------ whole-layer oracle
def moe_reference(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                  w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, w3_EDF: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense loop over experts: y[t] = sum_k w[t,k] * expert_{idx[t,k]}(x[t]); SwiGLU if w3 is given, else GELU."""
    out = torch.zeros_like(x_TD, dtype=torch.float32)
    for e in range(w1_EDF.shape[0]):
        tok, k = (topk_idx_TK == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x_TD[tok] @ w1_EDF[e]
        h = torch.nn.functional.silu(h) * (x_TD[tok] @ w3_EDF[e]) if w3_EDF is not None else \
            torch.nn.functional.gelu(h)
        out.index_add_(0, tok, (h @ w2_EFD[e]).float() * topk_weights_TK[tok, k, None].float())
    return out.to(x_TD.dtype)


# ------------------------------------------------------------ hierarchical all-to-all: pack / unpack rows
# (appended by the comm owner; the CUDA op csrc/hier_pack is tested against these)
def segment_row_index(starts_K: torch.Tensor, lengths_K: torch.Tensor) -> torch.Tensor:
    """Row indices of K segments laid end to end: [starts[0], .., starts[0]+lengths[0]-1, starts[1], ..].

    starts_K, lengths_K: int64. Returns int64 [sum(lengths)]. No Python loop over segments or rows.
    """
    lengths = lengths_K.to(torch.int64)
    total = int(lengths.sum())
    first = torch.cumsum(lengths, 0) - lengths  # position of each segment in the concatenation
    shift = torch.repeat_interleave(starts_K.to(torch.int64) - first, lengths, output_size=total)
    return shift + torch.arange(total, dtype=torch.int64, device=lengths.device)


def segment_copy_reference(src_SD: torch.Tensor, src_starts_K: torch.Tensor, dst_ND: torch.Tensor,
                           dst_starts_K: torch.Tensor, lengths_K: torch.Tensor) -> torch.Tensor:
    """dst[dst_starts[k] + r] = src[src_starts[k] + r] for r < lengths[k], every segment k; returns dst.

    Rows are dim 0 (any trailing shape, equal in src and dst); segments of dst must not overlap.
    """
    src_idx = segment_row_index(src_starts_K, lengths_K)
    dst_idx = segment_row_index(dst_starts_K, lengths_K)
    dst_ND[dst_idx] = src_SD.index_select(0, src_idx)
    return dst_ND


def pack_segments_reference(src_SD: torch.Tensor, starts_K: torch.Tensor, lengths_K: torch.Tensor) -> torch.Tensor:
    """Gathers K row segments of src into one contiguous [sum(lengths), ...] tensor (a packed message)."""
    return src_SD.index_select(0, segment_row_index(starts_K, lengths_K))


def unpack_segments_reference(packed_ND: torch.Tensor, dst_SD: torch.Tensor, starts_K: torch.Tensor,
                              lengths_K: torch.Tensor) -> torch.Tensor:
    """Scatters a packed message's consecutive pieces to the K row segments of dst (in place); returns dst."""
    dst_SD[segment_row_index(starts_K, lengths_K)] = packed_ND
    return dst_SD


# ------------------------------------------------------------------------------------------------ optimizer
def adamw_reference(grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    lowp: Optional[torch.Tensor], step: float, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, decoupled: bool = True,
                    grad_multiplier: Optional[torch.Tensor] = None) -> None:
    """One Adam(W) step of a 1-D fp32 ``master`` range, in place, from ``grad`` (any float dtype, as many elements).

    torch.optim.Adam's single-tensor update in its own order of operations (so fp32 results are bit-identical
    to it), with two additions: the gradient is first multiplied by ``grad_multiplier`` (a 0-dim fp32 tensor:
    gradient clipping or loss-scale division), and ``lowp`` (1-D, as long as master) receives the updated
    master, rounded. ``step``: the step count of this update (>= 1). ``decoupled``: AdamW's weight decay on
    the weights, else Adam's L2 term added to the gradient. ``grad`` is never written.
    """
    g = grad.reshape(-1).to(torch.float32)
    if grad_multiplier is not None:
        g = g * grad_multiplier
    if weight_decay != 0:
        if decoupled:
            master.mul_(1 - lr * weight_decay)
        else:
            g = g.add(master, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-step_size)
    if lowp is not None:
        lowp.copy_(master)
