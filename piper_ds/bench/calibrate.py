"""``python -m piper_ds.bench.calibrate``: micro-benchmarks of this machine, written as a planner profile JSON.

Measures (on CUDA when present, else a tiny CPU mode that still writes a valid profile):

- dense GEMM rate (one large bf16 matmul; fp32 on CPU);
- grouped GEMM rate against rows per expert (``torch._grouped_mm``; a per-expert loop where it does not run),
  for the model's expert shapes;
- causal attention fwd+bwd rate (``scaled_dot_product_attention``), counted as 6*b*s^2*H*hd FLOPs;
- device copy bandwidth;
- the per-block overheads the rates do not explain: one transformer block with a ``PiperMoE`` (ep 1) and one
  dense block, the model's shapes, timed forward + backward at micro-batches 1, 2, 4; the residual
  (measured - the planner's own block prediction with zero overhead, see :mod:`piper_ds.planner.overheads`)
  is fitted to ``moe_layer_overhead_us`` + ``moe_overhead_ns_per_row`` x routed rows and
  ``dense_layer_overhead_us``;
- the seconds per parameter of the engines' fused bf16 ZeRO-1 ``engine.step()`` (:mod:`piper_ds.runtime.zero_step`),
  on one GPU (:mod:`piper_ds.bench.zero_step`; CUDA only), for the planner's optimizer term;
- when launched with several ranks (``deepspeed --num_gpus N --module piper_ds.bench.calibrate`` or
  ``torchrun --nproc_per_node N -m piper_ds.bench.calibrate``):
  all-to-all time by size inside a node and across nodes, and point-to-point, fitted to alpha-beta tiers.

Use it with ``python -m piper_ds.plan ... --profile <out>``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from piper_ds.bench.common import seconds_per_call, sync
from piper_ds.planner.cluster import ClusterSpec, LinkTier
from piper_ds.planner.overheads import OverheadFit, apply_fits, block_prediction, block_rows, fit_overhead
from piper_ds.planner.profile import PlatformProfile
from piper_ds.system.specs import ModelSpec


def timed(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs after ``warmup`` runs (host clock, device waited for)."""
    return statistics.median(seconds_per_call(lambda i: fn(), device, iters, warmup, clock="host"))


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """rows of ``a`` [R, K] split at ``offs`` (cumulative ends, int32 [E]) times ``b`` [E, K, N]."""
    try:
        return torch._grouped_mm(a, b, offs=offs)
    except (RuntimeError, NotImplementedError):
        pass  # unsupported dtype/device: fall back to the loop below
    outs, start = [], 0
    for e, end in enumerate(offs.tolist()):
        outs.append(a[start:end] @ b[e])
        start = end
    return torch.cat(outs)


def bench_dense(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Dense n x n x n matmul rate, TFLOP/s."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, iters=iters) / 1e12


def bench_grouped(device: torch.device, dtype: torch.dtype, d: int, f: int, experts: int,
                  rows_list: Sequence[int], iters: int) -> List[Tuple[int, float]]:
    """(rows per expert, TFLOP/s) for the up (d -> f) and down (f -> d) expert GEMMs, averaged by time."""
    out = []
    w_up = torch.randn(experts, f, d, device=device, dtype=dtype).transpose(-2, -1)  # [E, d, f], col-major
    w_dn = torch.randn(experts, d, f, device=device, dtype=dtype).transpose(-2, -1)  # [E, f, d]
    for rows in rows_list:
        total = rows * experts
        offs = torch.arange(1, experts + 1, device=device, dtype=torch.int32) * rows
        x = torch.randn(total, d, device=device, dtype=dtype)
        h = torch.randn(total, f, device=device, dtype=dtype)
        t = timed(lambda: grouped_mm(x, w_up, offs), device, iters=iters)
        t += timed(lambda: grouped_mm(h, w_dn, offs), device, iters=iters)
        out.append((rows, 2 * 2 * total * d * f / t / 1e12))
    return out


def bench_attention(device: torch.device, dtype: torch.dtype, b: int, h: int, s: int, hd: int,
                    iters: int) -> float:
    """Causal SDPA forward + backward rate, TFLOP/s, counting 6*b*s^2*h*hd (the planner's convention)."""
    q, k, v = (torch.randn(b, h, s, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.backward(torch.ones_like(o))

    return 6 * b * s * s * h * hd / timed(step, device, iters=iters) / 1e12


def bench_copy(device: torch.device, nbytes: int, iters: int) -> float:
    """Device-to-device copy bandwidth (read + write), TB/s."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, iters=iters) / 1e12


def fit_tier(points: Sequence[Tuple[float, float]]) -> Optional[LinkTier]:
    """Alpha-beta fit of (bytes, seconds) points -> LinkTier; None without a usable point.

    Least squares when the points rise with size; else (noisy timings) bandwidth from the largest transfer
    and latency from the fastest one.
    """
    pts = [(float(x), float(y)) for x, y in points if x > 0 and y > 0]
    if not pts:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    if slope > 0:
        return LinkTier(bw_gbps=1.0 / slope / 1e9, latency_us=max(my - slope * mx, 0.0) * 1e6)
    big = max(pts)
    return LinkTier(bw_gbps=big[0] / big[1] / 1e9, latency_us=min(ys) * 1e6)


def _groups_by_node() -> Tuple[List[List[int]], List[List[int]]]:
    """(ranks of each node, ranks sharing a local index across nodes), from every rank's host name."""
    hosts: List[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    nodes: Dict[str, List[int]] = {}
    for r, host in enumerate(hosts):
        nodes.setdefault(host, []).append(r)
    intra = list(nodes.values())
    local = min(len(g) for g in intra)
    inter = [[g[i] for g in intra] for i in range(local)] if len(intra) > 1 else []
    return intra, inter


def bench_alltoall(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], groups: List[List[int]],
                   iters: int) -> List[Tuple[float, float]]:
    """(bytes each rank sends to others, seconds) of all_to_all_single per size, within each of ``groups``
    (every rank must call; handles are made collectively). Times are the max over ranks."""
    handles = [dist.new_group(g) for g in groups]
    mine = next((i for i, g in enumerate(groups) if dist.get_rank() in g), None)
    out = []
    for nbytes in sizes:
        t = 0.0
        if mine is not None:
            n = len(groups[mine])
            numel = max(nbytes // dtype.itemsize // n, 1) * n
            src = torch.ones(numel, device=device, dtype=dtype)
            dst = torch.empty_like(src)
            t = timed(lambda: dist.all_to_all_single(dst, src, group=handles[mine]), device, iters=iters)
        tt = torch.tensor([t], device=device, dtype=torch.float64)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        n = len(groups[0])
        out.append((nbytes * (n - 1) / n, tt.item()))
    return out


def bench_p2p(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], peer: int,
              iters: int) -> List[Tuple[float, float]]:
    """(bytes, seconds) of one send from rank 0 to ``peer`` (half a ping-pong); other ranks idle."""
    out = []
    me = dist.get_rank()
    for nbytes in sizes:
        buf = torch.ones(max(nbytes // dtype.itemsize, 1), device=device, dtype=dtype)

        def ping():
            if me == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            elif me == peer:
                dist.recv(buf, 0)
                dist.send(buf, 0)

        t = timed(ping, device, iters=iters) / 2 if me in (0, peer) else 0.0
        tt = torch.tensor([t], device=device, dtype=torch.float64)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        out.append((float(nbytes), tt.item()))
        dist.barrier()
    return out


def model_spec(name: str, n_shared_experts: Optional[int] = None) -> ModelSpec:
    """A model preset by name, or the ``piper.model`` block of a ds_config JSON file; ``n_shared_experts``
    (when given) overrides the model's."""
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise ValueError(f"--model {name!r}: no such ds_config file")
        with open(name) as f:
            block = (json.load(f).get("piper") or {}).get("model")
        if not block:
            raise ValueError(f"--model {name!r}: the ds_config has no piper.model block")
        spec = ModelSpec.from_block(block)
    else:
        spec = ModelSpec.preset(name)
    if n_shared_experts is not None:
        spec = spec.model_copy(update={"n_shared_experts": n_shared_experts})
    return ModelSpec(**spec.model_dump())  # validated again


def build_block(spec: ModelSpec, moe: bool, kernels: str, device: torch.device, dtype: torch.dtype):
    """One block of the reference model (``piper_ds.models``): attention + a ``PiperMoE`` (ep 1, the model's
    routing options, ``kernels``) or + the dense FFN, on ``device`` in ``dtype``."""
    from piper_ds.config import merge_moe_with_model
    from piper_ds.models.layers import Attention, Block, DenseFFN, PiperMoEFFN
    from piper_ds.moe import FeedForward, PiperMoE
    torch.manual_seed(1234)
    attn = Attention(spec.d_model, spec.n_heads, spec.kv_heads, spec.hd, spec.seq_len)
    if moe:
        cfg = merge_moe_with_model(spec, {"kernels": kernels})
        ffn = PiperMoEFFN(PiperMoE(spec.d_model, spec.num_experts, spec.d_ffn_expert, ep_size=1, config=cfg))
    else:
        ffn = DenseFFN(FeedForward(spec.d_model, spec.ffn_dense, spec.activation))
    return Block(attn, ffn, spec.d_model).to(device=device, dtype=dtype)


def time_block(block, spec: ModelSpec, micro_batch: int, device: torch.device, dtype: torch.dtype, warmup: int,
               iters: int) -> List[float]:
    """Seconds of ``iters`` forward + backward passes of ``block`` after ``warmup`` ones, each on fresh random
    (non-zero) inputs and output gradients [micro_batch, seq_len, d_model]; CUDA events on GPU."""
    gen = torch.Generator(device=device).manual_seed(7 + micro_batch)
    shape = (micro_batch, spec.seq_len, spec.d_model)
    xs = [torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(warmup + iters)]
    gs = [torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(warmup + iters)]
    zero = torch.zeros((), device=device, dtype=torch.float32)

    def step(i: int) -> None:
        h, aux = block((xs[i].requires_grad_(True), zero))
        outs, grads = ([h, aux], [gs[i], torch.ones_like(aux)]) if aux.requires_grad else ([h], [gs[i]])
        torch.autograd.backward(outs, grads)

    def fresh() -> None:
        block.zero_grad(set_to_none=True)
        sync(device)

    return seconds_per_call(step, device, warmup + iters, before=fresh)[warmup:]


def bench_block_overheads(prof: PlatformProfile, spec: ModelSpec, cluster: ClusterSpec, device: torch.device,
                          dtype: torch.dtype, kernels: str, micro_batches: Sequence[int], warmup: int,
                          iters: int) -> Tuple[OverheadFit, OverheadFit, Dict[str, object]]:
    """Times an MoE and a dense block at each micro-batch; fits their residuals over ``prof``'s rates.

    Returns (MoE fit: fixed us + ns per routed row, dense fit: fixed us, the raw table for ``measurements``).
    """
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    record: Dict[str, object] = {"kernels": kernels, "precision": precision, "model": spec.to_block(),
                                 "micro_batches": list(micro_batches), "warmup": warmup, "iters": iters}
    fits = {}
    for moe in (True, False):
        block = build_block(spec, moe, kernels, device, dtype)
        points, rows_out = [], []
        for mb in micro_batches:
            times = time_block(block, spec, mb, device, dtype, warmup, iters)
            pred = block_prediction(spec, cluster, prof, mb, moe, precision)
            x = block_rows(spec, mb) if moe else mb * spec.seq_len
            measured = statistics.median(times)
            points.append((x, measured - pred["total"]))
            rows_out.append({"micro_batch": mb, "tokens": mb * spec.seq_len, "rows": x, "measured_s": measured,
                             "times_s": times, "predicted_no_overhead_s": pred["total"],
                             "predicted_parts_s": pred, "residual_s": measured - pred["total"]})
        kind = "moe" if moe else "dense"
        fit = fit_overhead(points, per_row=moe, label=f"{kind} block")
        for r in rows_out:
            r["predicted_with_fit_s"] = r["predicted_no_overhead_s"] + fit.seconds(r["rows"] if moe else 0)
        fits[kind] = fit
        record[kind] = {"points": rows_out, "fit": fit.as_dict()}
        del block
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["warnings"] = fits["moe"].warnings + fits["dense"].warnings
    return fits["moe"], fits["dense"], record


def _setup(args) -> Tuple[torch.device, bool]:
    cuda = torch.cuda.is_available() and not args.cpu
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device, args.tiny or not cuda


def _comm(device: torch.device, dtype: torch.dtype, tiny: bool, iters: int) -> Dict[str, object]:
    sizes = [2 ** p for p in ((12, 16, 20) if tiny else (20, 22, 24, 26, 28))]
    intra, inter = _groups_by_node()
    res: Dict[str, object] = {"a2a_sizes": sizes, "tiers": {}, "p2p_tiers": {}}
    if min(len(g) for g in intra) > 1:
        pts = bench_alltoall(device, dtype, sizes, intra, iters)
        res["a2a_intra_node"] = pts
        res["tiers"]["intra_node"] = fit_tier(pts)
        peer = intra[0][1]
        pts = bench_p2p(device, dtype, sizes, peer, iters)
        res["p2p_intra_node"] = pts
        res["p2p_tiers"]["intra_node"] = fit_tier(pts)
    if inter:
        pts = bench_alltoall(device, dtype, sizes, inter, iters)
        res["a2a_inter_node"] = pts
        res["tiers"]["inter_node"] = fit_tier(pts)
        pts = bench_p2p(device, dtype, sizes, intra[1][0], iters)
        res["p2p_inter_node"] = pts
        res["p2p_tiers"]["inter_node"] = fit_tier(pts)
    return res


def calibrate(args) -> Optional[PlatformProfile]:
    """Runs the benchmarks; returns the profile on rank 0 (None on other ranks)."""
    device, tiny = _setup(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model_spec(args.model, args.n_shared_experts)
    iters = 2 if tiny else args.iters
    d, f, hd = (64, 32, 16) if tiny else (model.d_model, model.d_ffn_expert, model.hd)
    rows = [4, 16, 64] if tiny else [16, 64, 128, 256, 512, 768, 2048, 8192]
    experts = 4 if tiny else min(16, model.num_experts)
    meas: Dict[str, object] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "dtype": str(dtype), "tiny": tiny, "shapes": {"d": d, "f": f, "experts": experts}}
    dense = bench_dense(device, dtype, 128 if tiny else 8192, iters)
    grouped = bench_grouped(device, dtype, d, f, experts, rows, iters)
    s = 64 if tiny else model.seq_len
    attn = bench_attention(device, dtype, 1, 2 if tiny else model.n_heads, s, hd, iters)
    copy = bench_copy(device, (1 << 24) if tiny else (1 << 30), iters)
    meas.update(dense_tflops=dense, grouped_gemm=grouped, attention_tflops=attn, copy_tbps=copy)
    comm: Dict[str, object] = {}
    if dist.is_initialized() and dist.get_world_size() > 1:
        comm = _comm(device, dtype, tiny, iters)
        meas.update({k: v for k, v in comm.items() if k not in ("tiers", "p2p_tiers")})
        meas["world_size"] = dist.get_world_size()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    prof = PlatformProfile(
        source=f"calibrate {meas['device']} x{meas.get('world_size', 1)} {socket.gethostname()} {stamp}"
               + (" (tiny)" if tiny else "") + f", kernels={args.kernels}",
        dense_tflops=dense, grouped_gemm=[(float(r), float(tf)) for r, tf in grouped], attention_tflops=attn,
        hbm_tbps=copy, attention_saves_scores=device.type != "cuda",
        tiers={k: v for k, v in comm.get("tiers", {}).items() if v is not None},
        p2p_tiers={k: v for k, v in comm.get("p2p_tiers", {}).items() if v is not None},
        measurements=meas)
    if not args.skip_blocks:
        prof = _calibrate_overheads(prof, args, device, dtype, tiny, iters)
    if not args.skip_optimizer and not tiny:
        prof = _calibrate_optimizer(prof, device)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return prof


def _calibrate_overheads(prof: PlatformProfile, args, device: torch.device, dtype: torch.dtype, tiny: bool,
                         iters: int) -> PlatformProfile:
    """``prof`` with the block overheads fitted on this device (every rank measures its own GPU; rank 0's
    figures are kept); warnings are printed by rank 0 and kept in ``measurements['block_overhead']``."""
    spec = ModelSpec.preset("tiny", n_layers=2, n_dense_layers=1, n_shared_experts=1) if tiny else \
        model_spec(args.model, args.n_shared_experts)
    moe_fit, dense_fit, record = bench_block_overheads(
        prof, spec, ClusterSpec.preset(args.cluster), device, dtype, args.kernels, (1, 2, 4),
        warmup=1 if tiny else 3, iters=iters)
    if not dist.is_initialized() or dist.get_rank() == 0:
        for w in record["warnings"]:
            print(f"WARNING: {w}")
    meas = dict(prof.measurements, block_overhead=record)
    return apply_fits(prof, moe_fit, dense_fit).model_copy(update={"measurements": meas})


#: Bytes of GPU memory per parameter the ZeRO step benchmark may need, with headroom: bf16 weight and gradient,
#: fp32 master and moments and the random gradient source, ~18 for the fused step (DeepSpeed's step adds its flat
#: and fp32 gradient copies: ~24).
ZERO_STEP_BYTES_PER_PARAM = 32


def _calibrate_optimizer(prof: PlatformProfile, device: torch.device) -> PlatformProfile:
    """``prof`` with ``optimizer_ns_per_param`` measured by rank 0 (:mod:`piper_ds.bench.zero_step`, the engines'
    fused ZeRO-1 ``engine.step()`` over up to 2**30 parameters, as many as half the free memory holds, on its GPU
    alone) and ``optimizer_step`` "fused"; the other ranks wait. When the benchmark fails, a WARNING says why and
    the profile keeps the analytic optimizer term (``optimizer_ns_per_param`` None)."""
    from piper_ds.bench.zero_step import bench_zero_step
    record = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        free, _ = torch.cuda.mem_get_info(device)
        numel = min(1 << 30, free // 2 // ZERO_STEP_BYTES_PER_PARAM)
        try:
            record = bench_zero_step(device, numel=numel, step="fused")
            print(f"ZeRO-1 fused step: {record['ns_per_param'] * 1e3:.1f} ps per parameter "
                  f"({record['seconds'] * 1e3:.1f} ms for {record['numel'] / 1e9:.2f} B parameters)")
        except (RuntimeError, ValueError) as exc:
            print(f"WARNING: ZeRO step benchmark failed ({exc}); the profile keeps the analytic optimizer term")
            record = {"error": str(exc)}
    if dist.is_initialized():
        dist.barrier()
    if record is None:
        return prof
    meas = dict(prof.measurements, zero_step=record)
    return prof.model_copy(update={"optimizer_ns_per_param": record.get("ns_per_param"), "optimizer_step": "fused",
                                   "measurements": meas})


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m piper_ds.bench.calibrate``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m piper_ds.bench.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="platform_profile.json", help="profile JSON to write (rank 0)")
    p.add_argument("--model", default="xmoe-small-swiglu",
                   help="model preset, or a ds_config JSON whose piper.model block to use, for the shapes")
    p.add_argument("--n-shared-experts", type=int, default=2,
                   help="override the model's shared experts (default 2: the reference model of "
                        "ds_configs/h200_x*.json); -1 keeps the model's")
    p.add_argument("--kernels", default="auto", choices=["auto", "cuda", "reference"],
                   help="PiperMoE gating/permutation kernels in the block benchmark (use what training uses)")
    p.add_argument("--cluster", default="h200-nvlink-ib400", help="cluster preset for the block predictions")
    p.add_argument("--skip-blocks", action="store_true", help="skip the block-overhead benchmark")
    p.add_argument("--skip-optimizer", action="store_true",
                   help="skip the ZeRO optimizer-step benchmark (CUDA only; up to about 34 GB of GPU memory)")
    p.add_argument("--iters", type=int, default=10, help="timed repetitions per point (median)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without CUDA)")
    p.add_argument("--cpu", action="store_true", help="ignore CUDA and run the tiny CPU mode")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    if args.n_shared_experts is not None and args.n_shared_experts < 0:
        args.n_shared_experts = None
    prof = calibrate(args)
    if prof is not None:
        prof.save(args.out)
        print(f"wrote {args.out}: dense {prof.dense_tflops:.3g} TFLOP/s, attention {prof.attention_tflops:.3g} "
              f"TFLOP/s, copy {prof.hbm_tbps:.3g} TB/s, grouped {prof.grouped_gemm}, tiers {list(prof.tiers)}")
        print(f"block overheads: MoE {prof.moe_layer_overhead_us:.1f} us + {prof.moe_overhead_ns_per_row:.3g} ns "
              f"per routed row, dense {prof.dense_layer_overhead_us:.1f} us (fwd+bwd per block)")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
