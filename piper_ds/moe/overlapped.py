"""The dispatch of :mod:`piper_ds.moe.dispatch` with one host wait per layer and the all-to-all in flight while
experts compute.

The layer's tokens are cut into ``chunks`` contiguous chunks (the same number on every rank, empty ones
included, so every rank makes the same collectives). Then:

1. counts, on the device: for every chunk and destination rank, the rows to send (one per token and rank) and
   the (row, expert) pairs they carry; one exchange of all of them, one wait for the host to read them. Every
   later size is known from these, so nothing else in the layer waits: the plans are built with their row
   counts given (``num_rows``), forward and backward;
2. for every chunk: send plan, gather, start the exchange of its rows and of their (slot, weight) metadata;
3. for every chunk: wait for its rows, expand them to local experts, grouped GEMMs, weighted sum per row, start
   the reverse exchange;
4. for every chunk: wait for the returned rows, sum them per source token.

Chunk c + 1's rows travel while chunk c's experts compute, and chunk c's outputs travel back while chunk c + 1's
experts compute. Backward mirrors it: autograd reaches the chunks' ``wait`` nodes (which launch the reverse
exchanges) before their ``start`` nodes (which wait for them), and runs the other chunk's expert backward in
between (:class:`piper_ds.comm.alltoall.AsyncExchange`). With one chunk this is the plain dispatch with a single
host wait. Numerics: every token's rows and sums are those of the unchunked dispatch.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from piper_ds.moe import dispatch
from piper_ds.moe.placement import ExpertPlacement


def chunk_counts(topk_idx_TK: torch.Tensor, placement: ExpertPlacement, chunks: int) -> torch.Tensor:
    """Per destination rank and chunk: (rows, pairs) to send, int64 [R, chunks, 2], on the device, no host wait.

    rows: tokens of the chunk with at least one expert on rank r (a token goes once per rank); pairs: the
    chunk's (token, expert) assignments on rank r, i.e. the rows rank r's experts compute. -1 = dropped.
    """
    R = placement.ep_size
    # dropped assignments go to a spare column R, cut off below; no op here waits for the device
    dest_TK = placement.rank_of[topk_idx_TK.clamp_min(0)].masked_fill(topk_idx_TK < 0, R)
    out = []
    for dest in dest_TK.tensor_split(chunks):
        rows = torch.zeros(dest.shape[0], R + 1, dtype=torch.int64, device=dest.device).scatter_(1, dest, 1).sum(0)
        pairs = torch.zeros(R + 1, dtype=torch.int64, device=dest.device).scatter_add_(
            0, dest.reshape(-1), torch.ones_like(dest.reshape(-1)))
        out.append(torch.stack([rows[:R], pairs[:R]], dim=1))
    return torch.stack(out, dim=1)


def _exchange_sizes(topk_idx_TK: torch.Tensor, placement: ExpertPlacement, transport, chunks: int):
    """(send [R][C][2], recv [R][C][2]) as host ints: the layer's only wait for the device."""
    send = chunk_counts(topk_idx_TK, placement, chunks)
    recv = transport.exchange_counts(send)
    return torch.stack([send, recv]).tolist()


def run(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weights_TK: torch.Tensor, placement: ExpertPlacement,
        transport, ops: dispatch.Ops, experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        chunks: int) -> Tuple[torch.Tensor, List[int]]:
    """Dispatch -> ``experts(h [N, D], tokens_per_slot [L]) -> [N, D]`` -> combine, overlapped over ``chunks``.

    ``transport`` must have ``start`` when ``chunks`` > 1 (:class:`~piper_ds.comm.alltoall.FlatAllToAll`).
    Returns (out [T, D], rows sent to each EP rank, summed over chunks).
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    ep, L = placement.ep_size, placement.num_local
    send, recv = _exchange_sizes(topk_idx_TK, placement, transport, chunks)
    parts = list(zip(x_TD.tensor_split(chunks), topk_idx_TK.tensor_split(chunks),
                     topk_weights_TK.tensor_split(chunks)))
    rows = [([send[r][c][0] for r in range(ep)], [recv[r][c][0] for r in range(ep)]) for c in range(chunks)]
    pairs = [sum(recv[r][c][1] for r in range(ep)) for c in range(chunks)]
    # one chunk has nothing to overlap: the synchronous exchange (one autograd node, not two)
    exchange = transport.start if chunks > 1 else (lambda x, s, r: _Done(transport(x, s, r)))

    # Each phase is a function so that its temporaries (send buffers, expert activations) are freed when it
    # returns, not when the layer does.
    sent = [_gather_and_send(x_c, idx_c, w_c, send_c, recv_c, placement, ops, exchange)
            for (x_c, idx_c, w_c), (send_c, recv_c) in zip(parts, rows)]  # 2. every chunk's rows on their way
    back = []
    for c, (send_c, recv_c) in enumerate(rows):  # 3. experts as rows arrive; outputs on their way back
        handle, x_ex, meta_ex = sent[c]
        sent[c] = None
        back.append((handle, _experts_and_return(x_ex, meta_ex, pairs[c], send_c, recv_c, L, ops, experts,
                                                 exchange)))
    outs = []
    for (handle, y_ex), (x_c, _, _) in zip(back, parts):  # 4. per-token sums as the outputs return
        y_back = y_ex.wait()
        outs.append(y_back if handle is None else ops.combine(y_back, handle, x_c.shape[0]))
    out = outs[0] if chunks == 1 else torch.cat(outs)
    return out, [sum(send[r][c][0] for c in range(chunks)) for r in range(ep)]


def _gather_and_send(x_c, idx_c, w_c, send_c: List[int], recv_c: List[int], placement: ExpertPlacement,
                     ops: dispatch.Ops, exchange):
    """Send plan, row gather and the start of the rows' and metadata's exchange of one chunk: (handle of the
    gathered rows or None when the rows are the tokens, rows in flight, metadata in flight)."""
    plan = _send_plan(idx_c, w_c, placement, ops, sum(send_c))
    x_send, meta, handle = dispatch.send_rows(x_c, plan, placement.ep_size, ops)
    return handle, exchange(x_send, send_c, recv_c), exchange(meta, send_c, recv_c)


def _experts_and_return(x_ex, meta_ex, pairs: int, send_c: List[int], recv_c: List[int], L: int,
                        ops: dispatch.Ops, experts, exchange):
    """Waits for one chunk's rows, runs them through the local experts, sums each row's experts (weighted) and
    starts the exchange back."""
    x_recv = x_ex.wait()
    h_ND, pair_rows, plan = dispatch.expand_received(x_recv, meta_ex.wait(), L, ops, num_rows=pairs)
    y_ND = experts(h_ND, plan.tokens_per_slot_L)
    y_recv = ops.combine(y_ND, pair_rows, x_recv.shape[0], plan.weight_N)
    return exchange(y_recv, recv_c, send_c)


class _Done:
    """A finished exchange with :class:`~piper_ds.comm.alltoall.AsyncExchange`'s ``wait``."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def wait(self) -> torch.Tensor:
        rows, self.rows = self.rows, None  # hand the rows over: the caller decides how long they live
        return rows


def _send_plan(idx_TK, weights_TK, placement: ExpertPlacement, ops: dispatch.Ops, num_rows: int):
    if ops.send_plan is None:
        _, finish = dispatch._send_plan(idx_TK, weights_TK, placement)
        return finish(num_rows)
    return ops.send_plan(idx_TK, weights_TK, placement.rank_of, placement.slot_of, placement.ep_size,
                         num_rows=num_rows)
