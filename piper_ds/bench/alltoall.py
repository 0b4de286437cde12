"""Hierarchical vs flat uneven all-to-all by message size: ``python -m piper_ds.bench.alltoall``.

Run under a launcher, one process per GPU (NCCL) or per CPU rank (gloo)::

    torchrun --nproc_per_node 4 -m piper_ds.bench.alltoall --out a2a_4gpu.json

For every size (bytes each rank sends) it times the flat transport (one ``all_to_all_single``) and the
hierarchical one under each ``--gpus-per-node`` view of the job (on one 4-GPU host: 1x4 and 2x2), with
warm-up, CUDA events (wall clock on CPU), the per-iteration maximum over ranks, and the median over
iterations. Before timing a size it checks, on fresh random inputs with random uneven splits (zeros
included), that the hierarchical output is bit-identical to the flat one (and the gradients, at the first
size). ``--topk K`` routes rows like MoE tokens (each token to K distinct ranks) and adds the hierarchical
views with several nodes and local ranks run with node dedup (plan made before timing; checked: rows equal
flat's, reverse equal per token), with the inter-node payload with and without dedup. ``--tiers`` adds
point-to-point ping-pong times per tier and their α-β fits (the planner's input, see
:mod:`piper_ds.comm.cost_model`); ``--count-bytes 'r*'`` adds the bytes that left through the matching network
interfaces (the emulated cluster's inter-node links). Results go to ``--out`` as JSON; the table prints last.
Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from piper_ds.bench.common import commit, device_name, seconds_per_call
from piper_ds.comm.alltoall import FlatAllToAll
from piper_ds.comm.cost_model import fit_alpha_beta
from piper_ds.comm.hierarchical import HierarchicalAllToAll
from piper_ds.comm.topology import Topology

_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_size(text: str) -> int:
    """'64MB' -> 67108864 (binary units B, KB, MB, GB)."""
    t = text.strip().upper()
    for unit in ("GB", "MB", "KB", "B"):
        if t.endswith(unit) and t[:-len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * _UNITS[unit])
    raise ValueError(f"size {text!r} is not like '64MB' (units B, KB, MB, GB)")


def fmt_size(n: float) -> str:
    for unit in ("GB", "MB", "KB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:g}{unit}"
    return f"{int(n)}B"


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m piper_ds.bench.alltoall")
    p.add_argument("--sizes", default="1MB,4MB,16MB,64MB,256MB,1GB" if cuda else "64KB,256KB,1MB,4MB",
                   help="bytes each rank sends, comma-separated (default: 1MB..1GB on GPU, 64KB..4MB on CPU)")
    p.add_argument("--gpus-per-node", default=None,
                   help="comma-separated views of the job for the hierarchical transport (default: the launcher's "
                   "value and half of it, e.g. 4,2 on one 4-GPU host = 1x4 and 2x2)")
    p.add_argument("--hidden", type=int, default=4096, help="row width (model dim D)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20 if cuda else 10)
    p.add_argument("--uneven", action="store_true", help="time random uneven splits instead of balanced ones")
    p.add_argument("--planned", action="store_true", help="also time the hierarchical call with a precomputed "
                   "plan (transport.plan: no lane round)")
    p.add_argument("--topk", type=int, default=0,
                   help="rows routed like MoE tokens: each token to TOPK distinct random ranks (one row per token "
                   "and rank), and the hierarchical views with several nodes and local ranks also timed with "
                   "node dedup ('dedup': a token crosses once per remote node). 0: random counts, no dedup")
    p.add_argument("--tiers", action="store_true", help="ping-pong per tier and α-β fits (planner input)")
    p.add_argument("--count-bytes", default=None, metavar="GLOB",
                   help="count tx bytes of interfaces matching GLOB in /proc/net/dev (local rank 0 of each node)")
    p.add_argument("--gloo-iface", default=None, metavar="TEMPLATE",
                   help="GLOO_SOCKET_IFNAME per rank, '{local_rank}' filled in (emulated cluster: one NIC per rank)")
    p.add_argument("--no-check", action="store_true", help="skip the bit-exactness checks against flat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    return p.parse_args(argv)


def init_distributed(gloo_iface: Optional[str] = None) -> torch.device:
    """Initialises the default group from the launcher's variables; NCCL on GPUs, gloo on CPU."""
    if gloo_iface:
        os.environ["GLOO_SOCKET_IFNAME"] = gloo_iface.format(local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def timed(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> List[float]:
    """Seconds per iteration (maximum over ranks), after ``warmup`` untimed calls; ranks start each together."""
    times = seconds_per_call(lambda i: fn(), device, iters, warmup, before=dist.barrier)
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def counts_row(rows: int, world: int, uneven: bool, gen: torch.Generator) -> List[int]:
    """How many of ``rows`` go to each rank: balanced, or multinomial with some ranks getting none."""
    if not uneven:
        return [rows // world + (1 if r < rows % world else 0) for r in range(world)]
    weights = torch.rand(world, generator=gen) * (torch.rand(world, generator=gen) > 0.25)
    if weights.sum() == 0:
        weights[0] = 1.0
    return torch.distributions.Multinomial(rows, probs=weights / weights.sum()).sample().long().tolist() \
        if rows else [0] * world


def iface_tx_bytes(pattern: str) -> int:
    """Sum of transmitted bytes of the network interfaces matching ``pattern`` (this network namespace)."""
    total = 0
    with open("/proc/net/dev") as f:
        for line in f.readlines()[2:]:
            name, data = line.split(":", 1)
            if fnmatch.fnmatch(name.strip(), pattern):
                total += int(data.split()[8])
    return total


def check_exact(flat, hiers: Dict[str, HierarchicalAllToAll], rows: int, args, dtype, device, grads: bool) -> bool:
    """Random uneven splits and data (fresh per call): every hierarchical output (and gradient) == flat's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(args.seed * 7919 + rows * 31 + rank)
    send = counts_row(rows, world, True, gen)
    recv = flat.exchange_counts(torch.tensor(send, device=device)).tolist()
    x = torch.randn(sum(send), args.hidden, generator=gen).to(dtype).to(device)
    w = torch.randn(sum(recv), args.hidden, generator=gen).to(dtype).to(device) if grads else None
    ok = True

    def run(t):
        xr = x.clone().requires_grad_(grads)
        y = t(xr, send, recv)
        if grads:
            y.backward(w)
        return y.detach(), xr.grad

    want_y, want_g = run(flat)
    for name, h in hiers.items():
        y, g = run(h)
        ok &= torch.equal(y, want_y) and (not grads or torch.equal(g, want_g))
        del y, g
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def routed_rows(rows: int, world: int, topk: int, gen: torch.Generator):
    """MoE-like rows: ``rows // topk`` tokens, each to ``topk`` distinct random ranks; rank-major, token order.

    Returns (send counts [world], token id of every row [S]).
    """
    T, k = max(rows // topk, 1), min(topk, world)
    pick = torch.rand(T, world, generator=gen).argsort(dim=1)[:, :k]
    hit_WT = torch.zeros(T, world, dtype=torch.bool).scatter_(1, pick, True).t()
    return hit_WT.sum(1).tolist(), torch.nonzero(hit_WT)[:, 1]


def check_dedup(flat, dedups: Dict[str, HierarchicalAllToAll], rows: int, args, dtype, device) -> bool:
    """Routed rows: every dedup view delivers flat's rows bit for bit; its reverse agrees per token."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(args.seed * 7919 + rows * 31 + rank)
    send, ids = routed_rows(rows, dist.get_world_size(), args.topk, gen)
    ids = ids.to(device)
    x = torch.randn(int(ids.max()) + 1 if ids.numel() else 0, args.hidden, generator=gen).to(dtype).to(device)[ids]
    recv = flat.exchange_counts(torch.tensor(send, device=device)).tolist()
    want, ok = flat(x, send, recv), True
    want_back = torch.zeros(x.shape, dtype=torch.float64, device=device).index_add_(
        0, ids, flat(want, recv, send).double())
    for h in dedups.values():
        plan = h.plan(torch.tensor(send, device=device), source_ids=ids)
        y = h(x, send, recv, plan=plan)
        back = torch.zeros_like(want_back).index_add_(0, ids, h(y, recv, send, plan=plan.reversed()).double())
        ok &= torch.equal(y, want) and torch.allclose(back, want_back, rtol=1e-2, atol=1e-2)
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def inter_node_rows(send: List[int], topo: Topology, rank: int) -> int:
    """Rows this rank sends to ranks on other nodes (flat, and hierarchical without dedup)."""
    return sum(c for r, c in enumerate(send) if topo.node_of(r) != topo.node_of(rank))


def ping_pong(peer_of: Dict[str, int], sizes: List[int], iters: int, device) -> Dict[str, List[List[float]]]:
    """One-way seconds (half a round trip, median) rank 0 <-> each tier's peer, by message size."""
    rank, out = dist.get_rank(), {}
    for tier, peer in peer_of.items():
        pts = []
        for n in sizes:
            buf = torch.zeros(max(n // 4, 1), dtype=torch.float32, device=device)
            times = []
            for i in range(iters + 2):
                dist.barrier()
                if rank not in (0, peer):
                    continue
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append((time.perf_counter() - t0) / 2)
            pts.append([buf.numel() * 4, statistics.median(times) if times else 0.0])
        t = torch.tensor([q[1] for q in pts], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank gets rank 0's measurements
        out[tier] = [[q[0], v] for q, v in zip(pts, t.tolist())]
    return out


def bench(args) -> int:
    device = init_distributed(args.gloo_iface)
    rank, world = dist.get_rank(), dist.get_world_size()
    env_topo = Topology.from_env()
    views = [int(v) for v in args.gpus_per_node.split(",")] if args.gpus_per_node else \
        sorted({env_topo.gpus_per_node, max(env_topo.gpus_per_node // 2, 1)}, reverse=True)
    dtype, elem = _DTYPES[args.dtype], torch.tensor([], dtype=_DTYPES[args.dtype]).element_size()
    world_group = dist.group.WORLD
    flat = FlatAllToAll(world_group)
    hiers = {f"hier {world // g}x{g}": HierarchicalAllToAll(world_group, Topology(world, g)) for g in views}
    topos = {name: Topology(world, g) for name, g in zip(hiers, views)}
    dedups = {f"hier {world // g}x{g} dedup": HierarchicalAllToAll(world_group, Topology(world, g), node_dedup=True)
              for g in views if args.topk and 1 < g < world}
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    results, checks, failed = [], [], False
    gen = torch.Generator().manual_seed(args.seed + rank)
    for k, size in enumerate(sizes):
        rows = max(size // (args.hidden * elem), world)
        if not args.no_check:
            ok = check_exact(flat, hiers, rows, args, dtype, device, grads=(k == 0))
            if dedups:
                ok &= check_dedup(flat, dedups, rows, args, dtype, device)
            checks.append({"size_bytes": size, "ok": ok, "gradients_checked": k == 0})
            failed |= not ok
        if args.topk:
            send, ids = routed_rows(rows, world, args.topk, gen)
            x = torch.randn(int(ids.max()) + 1 if ids.numel() else 0, args.hidden, device=device).to(dtype)[
                ids.to(device)]
        else:
            send = counts_row(rows, world, args.uneven, gen)
            x = torch.randn(sum(send), args.hidden, device=device).to(dtype)
        recv = flat.exchange_counts(torch.tensor(send, device=device)).tolist()
        runs, plans = {"flat": lambda: flat(x, send, recv)}, {}
        for name, h in hiers.items():
            runs[name] = (lambda h=h: h(x, send, recv))
            if args.planned:
                plans[name + " planned"] = plan = h.plan(torch.tensor(send, device=device))
                runs[name + " planned"] = (lambda h=h, plan=plan: h(x, send, recv, plan=plan))
        for name, h in dedups.items():
            plans[name] = plan = h.plan(torch.tensor(send, device=device), source_ids=ids.to(device))
            runs[name] = (lambda h=h, plan=plan: h(x, send, recv, plan=plan))
        for name, fn in runs.items():
            before = iface_tx_bytes(args.count_bytes) if args.count_bytes else 0
            times = timed(fn, args.warmup, args.iters, device)
            entry = {"size_bytes": size, "transport": name, "rows_sent": sum(send), "times_s": times,
                     "median_s": statistics.median(times)}
            topo = topos.get(name.replace(" planned", "").replace(" dedup", ""), env_topo)
            mine = plans[name].inter_node_rows() if name in plans else inter_node_rows(send, topo, rank)
            model = torch.tensor([mine * args.hidden * elem], device=device)
            dist.all_reduce(model)
            entry["inter_node_payload_bytes"] = int(model.item())
            if args.count_bytes:
                local0 = int(os.environ.get("LOCAL_RANK", rank)) == 0
                delta = (iface_tx_bytes(args.count_bytes) - before) if local0 else 0
                moved = torch.tensor([delta], dtype=torch.float64, device=device)
                dist.all_reduce(moved)
                entry["iface_tx_bytes_per_call"] = moved.item() / (args.iters + args.warmup)
            results.append(entry)
        del x
    meta = {"world_size": world, "backend": dist.get_backend(), "device": device_name(device),
            "launcher_topology": f"{env_topo.num_nodes}x{env_topo.gpus_per_node} ({env_topo.source})",
            "hidden": args.hidden, "dtype": args.dtype, "warmup": args.warmup, "iters": args.iters,
            "uneven": args.uneven, "topk": args.topk, "torch": torch.__version__, "commit": commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    report = {"meta": meta, "results": results, "checks": checks, "fits": _fits(results)}
    if args.tiers:
        peers = {"intra": 1} if env_topo.gpus_per_node > 1 else {}
        if env_topo.num_nodes > 1:
            peers["inter"] = env_topo.gpus_per_node
        tier_sizes = [2**p for p in range(10, 27 if device.type == "cuda" else 23, 2)]
        pts = ping_pong(peers, tier_sizes, 10, device)
        report["tiers"] = {t: {"points": p, "fit": fit_alpha_beta([tuple(q) for q in p]).to_dict()}
                           for t, p in pts.items()}
    if rank == 0:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        print(format_table(report))
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


def _fits(results) -> Dict[str, dict]:
    """Effective α-β of each transport's whole exchange against bytes per rank."""
    out = {}
    for name in dict.fromkeys(r["transport"] for r in results):
        pts = [(r["size_bytes"], r["median_s"]) for r in results if r["transport"] == name]
        if len({p[0] for p in pts}) >= 2:
            out[name] = fit_alpha_beta(pts).to_dict()
    return out


def format_table(report) -> str:
    """size | flat ms (GB/s) | each hierarchical ms (x flat) | check — plus tier fits when measured."""
    res, checks = report["results"], {c["size_bytes"]: c["ok"] for c in report["checks"]}
    names = list(dict.fromkeys(r["transport"] for r in res))
    by = {(r["size_bytes"], r["transport"]): r for r in res}
    head = ["size/rank"] + [f"{n} ms" for n in names] + ["check"]
    if any(n.endswith(" dedup") for n in names):
        head.insert(-1, "inter-node MiB (plain / dedup)")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for size in dict.fromkeys(r["size_bytes"] for r in res):
        flat = by[size, "flat"]["median_s"]
        cells = [fmt_size(size), f"{flat * 1e3:.3f} ({size / flat / 1e9:.3g} GB/s)"]
        for n in names[1:]:
            t = by[size, n]["median_s"]
            cells.append(f"{t * 1e3:.3f} ({t / flat:.2f}x)")
        for n in (n for n in names if n.endswith(" dedup")):
            head_bytes = by[size, n.replace(" dedup", "")]["inter_node_payload_bytes"]
            cells.append(f"{head_bytes / 2**20:.2f} / {by[size, n]['inter_node_payload_bytes'] / 2**20:.2f}")
            break
        cells.append({True: "ok", False: "MISMATCH"}.get(checks.get(size), "-"))
        lines.append(" | ".join(cells))
    m = report["meta"]
    lines.insert(0, f"# all-to-all, {m['world_size']} ranks ({m['launcher_topology']}), {m['backend']}, "
                    f"{m['device']}, D={m['hidden']} {m['dtype']}, median of {m['iters']}")
    for tier, t in report.get("tiers", {}).items():
        bw = t["fit"]["bandwidth_GBps"]
        lines.append(f"tier {tier}: alpha {t['fit']['alpha_us']:.1f} us, bandwidth "
                     f"{'inf' if bw is None else f'{bw:.2f}'} GB/s")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m piper_ds.bench.alltoall``; returns the exit status."""
    return bench(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
