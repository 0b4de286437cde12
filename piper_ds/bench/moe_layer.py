"""One MoE layer forward+backward: PiperMoE against stock ``deepspeed.moe.layer.MoE`` (and DeepSpeed AutoEP's
layer), side by side.

Run on GPUs, one process per GPU, EP over all of them::

    torchrun --nproc_per_node 4 -m piper_ds.bench.moe_layer --out moe_layer.json
    python -m piper_ds.bench.moe_layer            # one GPU (ep=1)

Shapes (``--tokens`` per GPU, 8192 by default, bf16, 2-matrix GELU experts as in the stock baseline;
``--activation swiglu`` for 3-matrix experts): (a) d 2048, f 1408, E 64, top-6 (fine-grained); (b) d 4096,
f 14336, E 8, top-2 (Mixtral-like). PiperMoE runs with the library's defaults (``--kernels auto``). Reports the
median of CUDA-event timed steps after warm-up (each step a forward + backward with the weight gradients set to
None first, as after an optimizer's ``zero_grad``), on rotating fresh random inputs, useful expert TFLOP/s per
GPU (routed tokens only, 3 GEMM passes), the layer's peak memory (CUDA max allocated during the timed steps less
what was allocated before the layer was built: its parameters, gradients and activations, not the inputs nor
anything an earlier peer left behind, so the figures do not depend on the order of the peers) and all-to-all
bytes sent per rank; for PiperMoE also, from a short profile, the kernels per step, the kernel time in grouped
GEMMs and the rest's share, and the median wall time over the kernel time (1.0: the GPU never waits for the
host). Before timing, every peer's output is checked against the dense PyTorch reference. ``--out`` writes one
JSON record per peer, shape, activation, token count and EP size, with the command, commit and GPU.

``--peers piper,stock,autoep --activation swiglu`` adds DeepSpeed AutoEP's dropless grouped-GEMM layer
(:mod:`piper_ds.bench.autoep_peer`; its experts are gated, so it runs with SwiGLU only and is skipped, with a
printed reason, for GELU); its output is checked against the same dense reference.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.distributed as dist

from piper_ds.bench.common import commit, init_distributed, seconds_per_call

SHAPES = {"a": dict(d=2048, f=1408, E=64, k=6), "b": dict(d=4096, f=14336, E=8, k=2)}


def build(peer: str, shape: dict, ep: int, activation: str, kernels: str, transport: str = "flat",
          gpus_per_node: int = 0, chunks: int = 1, cuda_graph: bool = False):
    """The layer of ``peer`` ('piper', 'stock' or 'autoep') in bf16 on this GPU; ``transport`` 'hierarchical' (or
    'hierarchical+dedup', with node-level dedup) plans the EP group as nodes of ``gpus_per_node`` ranks (0: all
    ranks on one node); ``chunks``: PiperMoE's ``overlap_chunks`` (flat transport); ``cuda_graph``: PiperMoE's
    option of that name."""
    from deepspeed.moe.layer import MoE
    from piper_ds.comm.topology import Topology
    from piper_ds.moe import FeedForward, PiperMoE
    torch.manual_seed(1234)
    if peer == "autoep":
        from piper_ds.bench.autoep_peer import AutoEPPeer
        layer = AutoEPPeer(shape, ep, dist.get_rank() % ep, activation, torch.device("cuda"), torch.bfloat16)
        layer.set_deepspeed_parallelism()
        return layer
    if peer == "piper":
        kind, _, extra = transport.partition("+")
        if transport not in ("flat", "hierarchical", "hierarchical+dedup"):
            raise ValueError(f"transport {transport!r}: use flat, hierarchical or hierarchical+dedup")
        layer = PiperMoE(shape["d"], shape["E"], shape["f"], ep_size=ep, top_k=shape["k"], activation=activation,
                         kernels=kernels, aux_loss_coef=0.01, transport=kind, node_dedup=extra == "dedup",
                         overlap_chunks=chunks, cuda_graph=cuda_graph)
    else:
        expert = FeedForward(shape["d"], shape["f"], activation, kernels="reference")  # as stock users write it
        layer = MoE(shape["d"], expert, num_experts=shape["E"],
                    ep_size=ep, k=shape["k"], capacity_factor=1.25, eval_capacity_factor=1.25, drop_tokens=True)
    layer.set_deepspeed_parallelism()
    if peer == "piper" and transport != "flat" and ep > 1:
        topo = Topology(dist.get_world_size(), gpus_per_node or dist.get_world_size())
        layer.bind_ep_group(layer.deepspeed_moe.ep_group, getattr(layer, "dp_group", None), topo)
    return layer.cuda().to(torch.bfloat16)


def check_against_reference(layer, x, rank, ep) -> float:
    """Relative error of the layer's output against the dense reference with all experts gathered."""
    from piper_ds.ops import reference as R
    from piper_ds.bench.autoep_peer import AutoEPPeer
    if isinstance(layer, AutoEPPeer):  # every rank drew the full weights
        with torch.no_grad():
            y, ref = layer(x)[0], layer.reference(x)
        return ((y.float() - ref).norm() / ref.norm()).item()
    core = layer.deepspeed_moe
    full = {}
    for name in ("w1", "w2", "w3"):
        p = getattr(core.experts, name)
        if p is None:
            continue
        parts = [torch.empty_like(p) for _ in range(ep)]
        dist.all_gather(parts, p.detach().contiguous(), group=core.ep_group)
        full[name] = torch.cat(parts).float()
    with torch.no_grad():
        y, _, _ = layer(x)
        cfg = layer.config
        g = R.gating_reference(x.float() @ core.gate.wg.weight.float().t(), cfg.top_k, cfg.score_func)
        ref = R.moe_reference(x.float(), g.topk_idx_TK, g.topk_weights_TK, full["w1"], full["w2"], full.get("w3"))
    return ((y.float() - ref).norm() / ref.norm()).item()


def rows_to_other_ranks(topk_idx_TK: torch.Tensor, placement, my_rank: int) -> int:
    """Rows PiperMoE's dispatch sends to other EP ranks: one per (token, other rank holding any of its experts),
    as the dispatcher counts them (:func:`piper_ds.moe.dispatcher.chunk_counts`). topk_idx_TK int64 [T, K]
    (-1 = dropped); ``placement``: the layer's :class:`~piper_ds.moe.placement.ExpertPlacement`."""
    from piper_ds.moe.dispatcher import chunk_counts
    rows_R = chunk_counts(topk_idx_TK, placement, 1)[:, 0, 0]
    return int(rows_R.sum() - rows_R[my_rank])


def a2a_bytes(layer, peer: str, shape: dict, x: torch.Tensor, ep: int) -> float:
    """Bytes this rank sends per forward of ``x`` in the two all-to-alls (dispatch + combine), activations only."""
    if ep == 1:
        return 0.0
    elt, tokens = 2, x.shape[0]  # bf16
    if peer == "piper":  # the routing of x by the layer's own router
        core = layer.deepspeed_moe
        with torch.no_grad():
            topk_idx = core.gate(x.reshape(-1, shape["d"])).topk_idx_TK
        rows = rows_to_other_ranks(topk_idx, layer.placement.to(x.device), dist.get_rank(core.ep_group))
        return 2.0 * rows * shape["d"] * elt
    if peer == "autoep":  # one row per (token, expert) on another rank, each way (expected, uniform routing)
        return 2.0 * tokens * shape["k"] * (ep - 1) / ep * shape["d"] * elt
    capacity = max(4, int(-(-tokens * shape["k"] * 1.25 // shape["E"])))  # DeepSpeed: ceil(T*cf*k/E) slots
    return 2.0 * shape["E"] * capacity * shape["d"] * elt * (ep - 1) / ep


def time_layer(layer, inputs, grads, warmup: int, iters: int):
    """Median ms of forward + backward over ``iters`` CUDA-event timed steps after ``warmup``, and the peak GB.

    Every step starts with the parameters' gradients set to None, as a training step does after the optimizer's
    ``zero_grad`` (the layer's weight gradients are then written, not added to a previous step's)."""
    def step(i):
        for p in layer.parameters():
            p.grad = None
        x = inputs[i % len(inputs)].requires_grad_(True)
        x.grad = None
        y, l_aux, _ = layer(x)
        if l_aux is None:  # AutoEP: no aux loss
            y.backward(grads[i % len(grads)])
        else:
            torch.autograd.backward([y, l_aux], [grads[i % len(grads)], torch.ones_like(l_aux)])
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = seconds_per_call(step, torch.device("cuda", torch.cuda.current_device()), iters)
    return 1e3 * statistics.median(times), torch.cuda.max_memory_allocated() / 1e9


def main(argv=None):
    import sys
    ap = argparse.ArgumentParser(prog="python -m piper_ds.bench.moe_layer", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="a,b")
    ap.add_argument("--peers", default="piper,stock",
                    help="comma list of piper, stock, autoep (DeepSpeed AutoEP's layer; --activation swiglu only)")
    ap.add_argument("--tokens", default="8192", help="comma list of tokens per GPU")
    ap.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    ap.add_argument("--kernels", default="auto",
                    help="comma list of PiperMoE kernels settings to run (the library's default: auto)")
    ap.add_argument("--cuda-graph", action="store_true", help="also run PiperMoE with cuda_graph (ep 1 only)")
    ap.add_argument("--transports", default="flat",
                    help="comma list of PiperMoE transports to run: flat, hierarchical, hierarchical+dedup "
                         "(node-level dedup; at ep > 1)")
    ap.add_argument("--chunks", default="1",
                    help="comma list of PiperMoE overlap_chunks to run with the flat transport (1 = no overlap)")
    ap.add_argument("--gpus-per-node", type=int, default=0,
                    help="ranks per node seen by the hierarchical transport (0: all; 1 on one host = every GPU a node)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON file for the results (rank 0)")
    ap.add_argument("--no-kernel-stats", action="store_true",
                    help="skip the short profile of PiperMoE (kernels per step, grouped-GEMM share, wall / kernel)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of PiperMoE (rank 0 prints)")
    ap.add_argument("--trace", default=None, help="with --profile: also write a Chrome trace to this path")
    args = ap.parse_args(argv)
    rank, ep = init_distributed(cuda=True)
    command = "python -m piper_ds.bench.moe_layer " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = dict(command=command if ep == 1 else f"torchrun --nproc_per_node {ep} -m piper_ds.bench.moe_layer "
                + command.split(" ", 3)[-1], commit=commit() or "unknown", gpu=torch.cuda.get_device_name(),
                torch=torch.__version__)
    _allocate_library_workspaces()
    rows = []
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        for tokens in [int(t) for t in args.tokens.split(",")]:
            rows += _run_shape(args, key, shape, tokens, rank, ep, meta)
    if rank == 0:
        _report(rows, args.out)
    dist.barrier()
    dist.destroy_process_group()


def _allocate_library_workspaces() -> None:
    """Runs one small GEMM of each kind the peers use, so that cuBLAS's workspaces (tens of MB, kept for the
    process's life) are allocated before any peer's baseline: otherwise the first peer measured is charged them
    in its peak memory and the later ones are not."""
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, a)
    torch.mm(a, a, out_dtype=torch.float32)
    torch._grouped_mm(a, torch.stack([a, a]), offs=torch.tensor([32, 64], device="cuda", dtype=torch.int32))
    torch.cuda.synchronize()


def _run_shape(args, key: str, shape: dict, tokens: int, rank: int, ep: int, meta: dict):
    gen = torch.Generator(device="cuda").manual_seed(rank + 1)
    inputs = [torch.randn(tokens, shape["d"], device="cuda", generator=gen, dtype=torch.bfloat16)
              for _ in range(3)]
    grads = [torch.randn_like(inputs[0]) for _ in range(3)]
    transports = args.transports.split(",") if ep > 1 else ["flat"]
    peers = args.peers.split(",")
    chunk_list = [int(c) for c in args.chunks.split(",")] if ep > 1 else [1]
    graphs = [False, True] if args.cuda_graph and ep == 1 else [False]
    runs = [("piper", k, t, c, g) for k in args.kernels.split(",") for t in transports
            for c in (chunk_list if t == "flat" else [1]) for g in graphs if "piper" in peers]
    runs += [(p, None, "flat", 1, False) for p in ("stock", "autoep") if p in peers]
    if "autoep" in peers and args.activation != "swiglu":
        runs.remove(("autoep", None, "flat", 1, False))
        if rank == 0:
            print("skipping autoep: its experts are gated (gate, up, down); run with --activation swiglu")
    rows = []
    for peer, kernels, transport, chunks, graph in runs:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        layer = build(peer, shape, ep, args.activation, kernels or "auto", transport, args.gpus_per_node, chunks,
                      graph)
        err = check_against_reference(layer, inputs[0], rank, ep) if peer != "stock" else float("nan")
        ms, mem = time_layer(layer, inputs, grads, args.warmup, args.iters)
        stats = {}
        if peer == "piper" and not args.no_kernel_stats:  # every rank runs it (the all-to-alls need them all)
            stats = _kernel_stats(layer, inputs, grads, ms, rank == 0 and args.profile,
                                  args.trace and f"{args.trace}.{key}.{tokens}.{kernels}.{transport}.{chunks}.json")
        mats = 3 if args.activation == "swiglu" else 2
        useful = 3 * 2 * tokens * shape["k"] * mats * shape["d"] * shape["f"]
        detail = f", chunks {chunks}" if transport == "flat" and ep > 1 else f", {transport}" * (ep > 1)
        name = peer if peer != "piper" else f"piper[{kernels}{detail}{', graph' if graph else ''}]"
        rows.append(dict(shape=key, activation=args.activation, tokens=tokens, peer=name, ep=ep, ms=ms,
                         tflops=useful / ms / 1e9, peak_gb=mem - before / 1e9, rel_err=err,
                         a2a_mb=a2a_bytes(layer, peer, shape, inputs[0], ep) / 1e6, **stats, **shape, **meta))
        del layer
        torch.cuda.empty_cache()
    return rows


def _is_grouped_gemm(name: str) -> bool:
    """torch._grouped_mm's kernels (CUTLASS grouped GEMMs)."""
    return "cutlass" in name.lower() and "group" in name.lower() or "GroupProblemShape" in name


def _kernel_stats(layer, inputs, grads, wall_ms: float, report: bool, trace=None) -> dict:
    """A profile of 3 steps: kernels per step, kernel time per step split into grouped GEMM and the rest, and the
    un-profiled median wall time over the kernel time. With ``report``: the top kernels and the Chrome trace."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_layer(layer, inputs, grads, warmup=0, iters=3)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / 3
    gemm_ms = sum(e.time_range.elapsed_us() for e in kernels if _is_grouped_gemm(e.name)) / 1e3 / 3
    stats = dict(kernels_per_step=round(len(kernels) / 3), kernel_ms=busy_ms, grouped_gemm_ms=gemm_ms,
                 rest_share=(busy_ms - gemm_ms) / busy_ms if busy_ms else float("nan"),
                 wall_over_kernel=wall_ms / busy_ms if busy_ms else float("nan"))
    if report:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        from piper_ds.pipeline.timeline import kernel_overlap
        share = kernel_overlap(kernels)
        print(f"per step: all-to-all kernels {share.comm_us / 3e3:.2f} ms, compute kernels "
              f"{share.compute_us / 3e3:.2f} ms, {share.hidden_share:.0%} of the all-to-all time under compute")
        if trace:
            prof.export_chrome_trace(trace)
    return stats


def _report(rows, out):
    try:
        from rich.console import Console
        from rich.table import Table
        table = Table(title="MoE layer fwd+bwd, bf16")
        cols = ("shape", "act", "tokens", "peer", "ep", "ms", "TFLOP/s/GPU", "peak GB", "a2a MB/rank", "rel err",
                "kernels", "GEMM ms", "rest %", "wall/kernel")
        for col in cols:
            table.add_column(col)
        for r in rows:
            k = "kernels_per_step" in r
            table.add_row(r["shape"], r["activation"], str(r["tokens"]), r["peer"], str(r["ep"]), f"{r['ms']:.2f}",
                          f"{r['tflops']:.1f}", f"{r['peak_gb']:.2f}", f"{r['a2a_mb']:.1f}", f"{r['rel_err']:.1e}",
                          str(r["kernels_per_step"]) if k else "-", f"{r['grouped_gemm_ms']:.2f}" if k else "-",
                          f"{100 * r['rest_share']:.0f}" if k else "-", f"{r['wall_over_kernel']:.2f}" if k else "-")
        Console(width=200).print(table)
    except ImportError:
        for r in rows:
            print(r)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
