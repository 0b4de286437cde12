"""A Hugging Face Qwen3-MoE model trained end to end on one GPU three ways, in one run: converted to PiperMoE
under ``piper_ds.initialize``, under DeepSpeed AutoEP, and as plain Hugging Face under DeepSpeed.

    python -m piper_ds.bench.hf_model --out hf_model.json      # one GPU, the xmoe-small-sized model
    python -m piper_ds.bench.hf_model --tiny                   # the same path on CPU at a tiny size

The model: ``transformers``' Qwen3-MoE with xmoe-small's dimensions (d 2048, 16 heads of 128, 64 experts top-6 of
ffn 1408, renormalised top-k as Qwen3-MoE's checkpoints have it, 7 layers, vocab 32000), random init, bf16,
built fresh for each peer from the same seed. Peers, each with its library's defaults:

* ``piper``: ``piper_ds.integrations.hf.convert`` (PiperMoE defaults) then ``piper_ds.initialize``;
* ``autoep``: ``deepspeed.initialize`` with ``"expert_parallel": {"enabled": true, "autoep_size": 1,
  "preset_model": "qwen3_moe"}``: AutoEP replaces the MoE blocks;
* ``hf``: ``deepspeed.initialize`` of the model as transformers builds it (its default experts implementation).

All three get the DeepSpeed settings of ``ds_configs/h200_x1.json`` (ZeRO-2, bf16, torch's fused AdamW,
micro-batch 4, gradient clipping 1.0; on CPU fp32 and unfused) and train ``--steps`` steps on the same random
tokens (seq 2048) with the model's own loss, ``engine(input_ids=x, labels=x).loss``. Reported per peer: the
median step time after ``--warmup`` steps and its split into forward + backward and the optimizer step
(``engine.step()``, timed with CUDA events), tokens/s, MFU (``6 * active params + 6 * L * seq * d`` FLOPs per
token over ``--peak-tflops``), peak memory (CUDA max allocated from the model's construction on; on CPU the
process's peak resident set, which only grows) and the first and last losses (the same weights and tokens: the
first loss agrees across peers). On a GPU each peer runs in a fresh process (a destroyed DeepSpeed engine keeps
part of its memory), so none starts with another's memory; a peer that fails is reported with its error and the
others run. ``--out`` writes one JSON record per peer with the command, commit and GPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from typing import Any, Dict, List

import torch

from piper_ds.bench.common import Clock, commit, device_name, init_distributed

SHAPES = {
    "xmoe-small": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                       num_hidden_layers=7, num_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
                       vocab_size=32000, max_position_embeddings=2048, seq=2048),
    "tiny": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_hidden_layers=2,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=256,
                 max_position_embeddings=64, seq=64),
}
PEERS = ("piper", "autoep", "hf")


def model_config(shape: str):
    """The Qwen3-MoE config of ``shape``: every layer MoE, top-k renormalised, transformers' defaults otherwise (no
    load-balancing loss); no KV cache, as in training."""
    from transformers import Qwen3MoeConfig
    fields = {k: v for k, v in SHAPES[shape].items() if k != "seq"}
    return Qwen3MoeConfig(**fields, norm_topk_prob=True, use_cache=False)


def ds_config(micro_batch: int, cuda: bool) -> Dict[str, Any]:
    """The DeepSpeed settings of ``ds_configs/h200_x1.json`` (without its "piper" block); on CPU fp32 and the
    unfused AdamW."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
        "steps_per_print": 10**6, "gradient_clipping": 1.0, "bf16": {"enabled": cuda},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                  "torch_adam": True, "fused": cuda}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4,
                                                     "warmup_num_steps": 100}},
        "zero_optimization": {"stage": 2, "overlap_comm": cuda, "contiguous_gradients": True,
                              "reduce_bucket_size": 200000000, "allgather_bucket_size": 200000000},
    }


def build_engine(peer: str, config, ds: Dict[str, Any], device: torch.device):
    """The DeepSpeed engine of ``peer`` around a freshly built model (same seed, same weights for every peer)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1234)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if peer == "piper":
        import piper_ds
        from piper_ds.integrations.hf import convert
        return piper_ds.initialize(model=convert(model), config=ds)[0]
    if peer == "autoep":
        ds = {**ds, "expert_parallel": {"enabled": True, "autoep_size": 1, "preset_model": "qwen3_moe"}}
    elif peer != "hf":
        raise ValueError(f"unknown peer {peer!r}; peers: {list(PEERS)}")
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)[0]


def run_peer(peer: str, args, config, seq: int, flops_per_token: float, device: torch.device) -> Dict[str, Any]:
    """Trains ``peer`` for ``args.steps`` steps; its record (step time, tokens/s, MFU, peak memory, losses)."""
    from piper_ds.data import RandomTokens
    from piper_ds.tracking import Throughput, peak_memory_gb
    resident = torch.cuda.memory_allocated() / 1e9 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = build_engine(peer, config, ds_config(args.micro_batch, device.type == "cuda"), device)
    data = RandomTokens(config.vocab_size, seq, args.micro_batch, seed=7)
    tput = Throughput(args.micro_batch * seq, flops_per_token, 1, args.peak_tflops)
    losses: List[float] = []
    optimizer_s: List[float] = []
    clock = Clock(device)
    for step in range(args.steps):
        ids = data.get("train", step, 0, 0)[0].to(device)
        tput.start()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        before = clock.mark()
        engine.step()
        after = clock.mark()
        tput.stop()  # synchronises: both marks are reached
        losses.append(loss.item())
        optimizer_s.append(clock.seconds(before, after))
    summary = tput.summary(args.warmup)
    step_opt = statistics.median(optimizer_s[args.warmup:])
    record = dict(peer=peer, step_s=summary["median_step_time_s"], tokens_per_s=summary["tokens_per_s"],
                  optimizer_step_s=step_opt, forward_backward_s=summary["median_step_time_s"] - step_opt,
                  mfu_pct=summary["mfu_pct"], tflops=summary["tflops_per_gpu"], peak_gb=peak_memory_gb(),
                  resident_before_gb=resident, first_loss=losses[0], last_loss=losses[-1], steps=args.steps,
                  warmup=args.warmup, optimizer=type(engine.optimizer).__name__)  # which ZeRO step ran
    engine.destroy()
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def _init() -> torch.device:
    cuda = torch.cuda.is_available()
    init_distributed(cuda)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def main(argv=None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run of the same path)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float, default=989.5, help="peak dense TFLOP/s of the GPU, for MFU")
    ap.add_argument("--out", default=None, help="JSON file for the records")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        raise ValueError(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): the median needs timed steps")
    peers = args.peers.split(",")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; peers: {list(PEERS)}")
    command = "python -m piper_ds.bench.hf_model " + " ".join(argv if argv is not None else sys.argv[1:])
    if len(peers) > 1 and torch.cuda.is_available():
        records = _run_isolated(peers, argv if argv is not None else sys.argv[1:], command)
    else:
        records = _run_here(args, peers, command)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    _report(records)
    return records


def _run_here(args, peers: List[str], command: str) -> List[Dict[str, Any]]:
    """The peers one after the other in this process (CPU, or one peer)."""
    from piper_ds.integrations.hf.model import flops_per_token
    device = _init()
    shape = "tiny" if args.tiny else "xmoe-small"
    config, seq = model_config(shape), SHAPES[shape]["seq"]
    flops = flops_per_token(config, seq)
    meta = dict(command=command, commit=commit(), gpu=device_name(device),
                torch=torch.__version__, model=f"qwen3_moe {shape}", seq=seq, micro_batch=args.micro_batch,
                flops_per_token=flops)
    records = [{**run_peer(peer, args, config, seq, flops, device), **meta} for peer in peers]
    import deepspeed.comm as dist
    dist.destroy_process_group()
    return records


def _run_isolated(peers: List[str], argv: List[str], command: str) -> List[Dict[str, Any]]:
    """Each peer in a fresh process: a DeepSpeed engine does not give all its GPU memory back when destroyed, so a
    later peer in the same process would start with an earlier one's memory (and run out of it). A peer that
    fails leaves a record naming its error; the others still run."""
    import subprocess
    import tempfile
    rest, skip = [], False
    for a in argv:  # the same arguments without --peers / --out
        if skip:
            skip = False
        elif a in ("--peers", "--out"):
            skip = True
        elif not a.startswith(("--peers=", "--out=")):
            rest.append(a)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for peer in peers:
            out = os.path.join(tmp, f"{peer}.json")
            proc = subprocess.run([sys.executable, "-m", "piper_ds.bench.hf_model", "--peers", peer, "--out", out,
                                   *rest])
            if proc.returncode == 0:
                with open(out) as f:
                    records += [{**r, "command": command} for r in json.load(f)]
            else:
                records.append(dict(peer=peer, command=command, error=f"exit status {proc.returncode}"))
    return records


def _report(records: List[Dict[str, Any]]) -> None:
    """The table, last: one row per peer, speed relative to the AutoEP peer when it ran."""
    failed = [r for r in records if "error" in r]
    records = [r for r in records if "error" not in r]
    for r in failed:
        print(f"{r['peer']}: failed ({r['error']})")
    base = {r["peer"]: r["tokens_per_s"] for r in records}.get("autoep")
    print(f"{'peer':<8} {'step s':>8} {'fwd+bwd s':>9} {'optim s':>8} {'tokens/s':>10} {'MFU %':>6} {'peak GB':>8} "
          f"{'first loss':>10} {'last loss':>10} {'vs AutoEP':>9}")
    for r in records:
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{r['peer']:<8} {r['step_s']:>8.3f} {r['forward_backward_s']:>9.3f} {r['optimizer_step_s']:>8.3f} "
              f"{r['tokens_per_s']:>10,.0f} {r['mfu_pct']:>6.1f} "
              f"{r['peak_gb']:>8.1f} {r['first_loss']:>10.4f} {r['last_loss']:>10.4f} {rel:>9}")


if __name__ == "__main__":
    main()
