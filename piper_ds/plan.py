"""``python -m piper_ds.plan`` (console script ``piper-plan``): search parallel layouts, write the ds_config.

Example::

    python -m piper_ds.plan --model xmoe-small --cluster h200-nvlink-ib400 --gpus 4 \\
        --global-batch 512 --seq 2048 --out ds_configs/plan.json --plot plots/

prints the ranked layouts (throughput, MFU, step and memory breakdowns) and the best layout's expert-migration
cost per MoE layer (bytes per expert, one swap's time, the break-even imbalance), writes the best layout's ds_config
(checked by DeepSpeed's own config parser) and prints the launch command. Exit status: 0 = written,
2 = bad arguments, 3 = nothing fits (the message names the binding constraint and by how much).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

EXIT_BAD_INPUT = 2
EXIT_NOTHING_FITS = 3


def _parser() -> argparse.ArgumentParser:
    from piper_ds.planner.cluster import CLUSTERS
    from piper_ds.system.specs import PRESETS

    p = argparse.ArgumentParser(prog="python -m piper_ds.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"model preset ({', '.join(sorted(PRESETS))}) or a JSON file with a piper.model block")
    p.add_argument("--seq", type=int, help="sequence length (overrides the model's seq_len)")
    p.add_argument("--cluster", default="h200-nvlink-ib400",
                   help=f"cluster preset ({', '.join(sorted(CLUSTERS))}) or a JSON file of ClusterSpec fields")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--out", default="ds_configs/plan.json", help="where to write the ds_config")
    p.add_argument("--profile", help="platform profile JSON from python -m piper_ds.bench.calibrate")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    p.add_argument("--pp", type=int, help="pin the pipeline stages")
    p.add_argument("--ep", type=int, help="pin the expert-parallel degree")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="pin the ZeRO stage")
    p.add_argument("--micro-batch", type=int, help="pin the micro-batch (sequences per GPU)")
    p.add_argument("--max-micro-batch", type=int, default=16, help="largest micro-batch the search tries")
    p.add_argument("--ckpt", choices=["auto", "on", "off"], default="auto", help="activation checkpointing")
    p.add_argument("--a2a", choices=["auto", "flat", "hierarchical"], default="auto", help="all-to-all")
    p.add_argument("--allow-cross-node-ep", action="store_true", help="let EP groups span nodes")
    p.add_argument("--overlap", action="store_true",
                   help="also consider the pipelined engine's two-half schedule that overlaps all-to-all with "
                        "compute (measured slower than 1F1B on 2 and 4 H200: docs/pipeline.md)")
    p.add_argument("--dualpipev", action="store_true",
                   help="also consider DeepSpeed's DualPipeV schedule (two virtual stages per rank) for pp > 1 "
                        "(tested on CPU, not yet measured on GPUs: docs/pipeline.md)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="training precision")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate written to the config")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="DIR",
                   help="write PNGs (memory per stage, step breakdown) to DIR (default: next to --out)")
    p.add_argument("--no-ds-check", action="store_true", help="skip parsing the config with DeepSpeed")
    return p


def _load_model(arg: str, seq: Optional[int]):
    from piper_ds.system.specs import ModelSpec

    if arg.endswith(".json") or os.path.isfile(arg):
        with open(arg) as f:
            block = json.load(f)
        block = block.get("piper", {}).get("model", block) if isinstance(block, dict) else block
        model = ModelSpec.from_block(block)
    else:
        model = ModelSpec.preset(arg)
    if seq is not None:
        model = ModelSpec(**{**model.model_dump(), "seq_len": seq})
    return model


def _load_cluster(arg: str):
    from piper_ds.planner.cluster import ClusterSpec

    if arg.endswith(".json") or os.path.isfile(arg):
        with open(arg) as f:
            return ClusterSpec(**json.load(f))
    return ClusterSpec.preset(arg)


class _DataParallelGrid:
    """Minimal mpu for DeepSpeedConfig: only the data-parallel world size (the batch rule's divisor)."""

    def __init__(self, dp: int):
        self.dp = dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp


def check_with_deepspeed(cfg: Dict[str, Any], dp: int):
    """Parses ``cfg`` with ``deepspeed.runtime.config.DeepSpeedConfig`` as a job with ``dp`` data-parallel
    ranks would; raises whatever DeepSpeed raises. Returns the DeepSpeedConfig."""
    from unittest import mock

    from deepspeed.runtime import config as ds_config  # heavy import, only when the check runs

    # Outside a launched job DeepSpeedConfig falls back to world size 1 when it cannot read the rank; answer
    # "rank 0" so that it takes the data-parallel size from the mpu, exactly as on rank 0 of the real job.
    with mock.patch.object(ds_config.dist, "get_rank", return_value=0):
        return ds_config.DeepSpeedConfig(json.loads(json.dumps(cfg)), mpu=_DataParallelGrid(dp))


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m piper_ds.plan`` / ``piper-plan``; returns the exit status."""
    from pydantic import ValidationError
    from rich.console import Console

    from piper_ds.planner import dsconfig, report
    from piper_ds.planner.profile import PlatformProfile
    from piper_ds.planner.search import NothingFits, SearchOptions, best, search

    args = _parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=200)
    err = Console(stderr=True)
    try:
        model = _load_model(args.model, args.seq)
        cluster = _load_cluster(args.cluster)
        profile = PlatformProfile.load(args.profile) if args.profile else PlatformProfile()
        opts = SearchOptions(pp=args.pp, ep=args.ep, zero_stage=args.zero, micro_batch=args.micro_batch,
                             activation_checkpointing={"auto": None, "on": True, "off": False}[args.ckpt],
                             a2a=None if args.a2a == "auto" else args.a2a, max_micro_batch=args.max_micro_batch,
                             allow_cross_node_ep=args.allow_cross_node_ep, consider_overlap=args.overlap,
                             consider_dualpipev=args.dualpipev,
                             precision=args.precision)
        result = search(model, cluster, args.gpus, args.global_batch, profile, opts)
    except (ValueError, TypeError, ValidationError, OSError) as e:
        err.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    try:
        top = best(result)
    except NothingFits as e:
        err.print(str(e), style="red", markup=False, highlight=False, soft_wrap=True)
        return EXIT_NOTHING_FITS
    console.print(f"model {model.name}: {model.param_counts()['total'] / 1e9:.2f} B params "
                  f"({model.param_counts()['active'] / 1e9:.2f} B active), seq {model.seq_len}; cluster "
                  f"{cluster.name}; {args.gpus} GPUs; global batch {args.global_batch} sequences; profile "
                  f"{profile.source}")
    report.print_plan(console, result.ranked, args.top, profile)
    if result.rejected:
        console.print("rejected: " + ", ".join(f"{k} {n}" for k, n in result.rejected.most_common()))
    cfg = dsconfig.build_ds_config(model, top.layout, top, lr=args.lr)
    if not args.no_ds_check:
        check_with_deepspeed(cfg, top.layout.dp)
    dsconfig.write_ds_config(cfg, args.out)
    console.print(f"wrote {args.out} ({top.layout.short()}: predicted {top.tokens_per_s:,.0f} tokens/s, "
                  f"MFU {100 * top.mfu:.1f}%, worst stage {top.worst.total / 2 ** 30:.1f} GiB)")
    if args.plot is not None:
        folder = args.plot or os.path.dirname(os.path.abspath(args.out))
        for path in report.plot_plan(result.ranked, folder, args.top):
            console.print(f"wrote {path}")
    if top.layout.pp > 1:
        module = "PiperDualPipeVModule" if top.layout.virtual_stages == 2 else "PiperPipelineModule"
        console.print(f"note: pp > 1 runs on the pipeline engine with a {module} (docs/pipeline.md), as "
                      "examples/train.py builds it from this config")
    console.print("launch:")
    console.print(dsconfig.launch_command(top.layout, cluster.gpus_per_node, args.out), soft_wrap=True,
                  highlight=False, markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
