"""Train the reference MoE LM with piper_ds.

Launch (any of):
    deepspeed --num_gpus 2 examples/train.py --deepspeed_config ds_configs/cpu_tiny.json
    torchrun --nproc_per_node 4 examples/train.py --deepspeed_config ds_configs/h200_x4.json
    srun --ntasks-per-node 4 python examples/train.py --deepspeed_config ds_configs/h200_x4.json

The model comes from the ds_config's "piper.model" block; data defaults to byte-level LM on the Python
standard library's sources (no download). Rank 0 shows a progress bar and, every steps_per_print optimizer
steps, one line of metrics; every metric also goes through engine.monitor (W&B / CSV / TensorBoard blocks).

With ``--hf-model DIR`` it trains a local Hugging Face MoE model instead (config, safetensors and tokenizer in DIR;
Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, DeepSeek-V2/V3), its MoE blocks converted to PiperMoE with each rank
loading only its experts (``piper_ds.integrations.hf.load``; the ds_config then has no "piper.model" block and
its "piper.moe" block holds dispatch options only). The text is tokenized with the model's tokenizer; the loss
is next-token cross-entropy plus the model's own load-balancing loss (its ``router_aux_loss_coef``, logged as
``aux``; n/a for DeepSeek models, which define none). ``--hf-export DIR2`` writes the trained model back as a
Hugging Face checkpoint with its tokenizer.

With ``"piper": {"parallel": {"pp_size": N}}`` (N > 1) the model is built as a pipeline
(``PiperPipelineModule``, or ``PiperDualPipeVModule`` for ``"piper": {"pipeline": {"schedule": "dualpipev"}}``) and
trained with ``engine.train_batch`` under the schedule the ds_config names; its loss is the pipeline's loss
(cross-entropy + aux loss, logged as ``loss``), and the engine reports the aux loss and the expert load.

Exit codes: 0 done; 1 an error (the rank that failed first prints its traceback, every other rank one line);
3 stopped by the divergence guard (``piper.runtime.max_skipped_steps`` skipped steps in a row; no checkpoint
is written at the stop); 4 a rank stopped answering (named by the heartbeat watchdog).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import piper_ds  # noqa: E402
from piper_ds.api import env_from_slurm  # noqa: E402
from piper_ds.runtime.errors import run_main  # noqa: E402

EXIT_DIVERGED = 3


def parse_args(argv=None) -> argparse.Namespace:
    import deepspeed
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="train until this many optimizer steps in total")
    p.add_argument("--data", default=None, help="text file or folder; 'random' = uniform random tokens; "
                   "default: piper.data.path, else the Python standard library sources")
    p.add_argument("--save-dir", default=None, help="checkpoint folder (DeepSpeed's format, experts per file, "
                   "published atomically); default: piper.checkpoint.save_dir, else no checkpoints")
    p.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints; 0 = at the end only")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="TAG",
                   help="load a checkpoint of the save folder first: without TAG the one 'latest' names, falling "
                   "back to the newest complete one when it is damaged; with TAG exactly that one")
    p.add_argument("--deepspeed-logs", action="store_true", help="show DeepSpeed's own per-rank log lines and "
                   "prints (piper.runtime.quiet_deepspeed = false)")
    p.add_argument("--metrics-out", default=None, help="rank 0 writes a JSON summary (median step time, tokens/s "
                   "per GPU, TFLOP/s per GPU, MFU, peak memory, losses) here")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the median in --metrics-out")
    p.add_argument("--stock-moe", action="store_true", help="build the MoE layers on stock "
                   "deepspeed.moe.layer.MoE (capacity 1.25, token dropping) for side-by-side runs")
    p.add_argument("--val-interval", type=int, default=None, help="steps between validation passes "
                   "(default: piper.data.val_interval; 0 = never)")
    p.add_argument("--seed", type=int, default=1234, help="model init seed (the data seed is piper.data.seed)")
    p.add_argument("--hf-model", default=None, help="train this local Hugging Face MoE model directory (config, "
                   "safetensors, tokenizer) converted to PiperMoE instead of the ds_config's piper.model")
    p.add_argument("--seq-len", type=int, default=None, help="with --hf-model: tokens per sequence (default "
                   "min(1024, the model's max_position_embeddings))")
    p.add_argument("--hf-export", default=None, help="with --hf-model: write the trained model (and its tokenizer) "
                   "here as a Hugging Face checkpoint at the end")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


def setup_env() -> None:
    """Under SLURM srun, map SLURM_* to the variables torch.distributed reads; pin the local GPU."""
    os.environ.update(env_from_slurm(dict(os.environ)))
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def all_mean(values: List[float], device) -> List[float]:
    """Means over all ranks (a collective)."""
    import deepspeed.comm as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_max(value: float, device) -> float:
    import deepspeed.comm as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def format_line(step: int, m: Dict[str, float]) -> str:
    """The one-line metrics summary printed every steps_per_print (n/a: not measured; a non-finite value is
    printed as nan / inf)."""
    def f(key, fmt, unit=""):
        v = m.get(key)
        return "n/a" if v is None else format(v, fmt) + unit
    return (f"step {step:>6} | loss {f('loss', '.4f')} | aux {f('aux_loss', '.4f')} | gnorm {f('grad_norm', '.3f')}"
            f" | skipped {m.get('skipped_steps', 0)}"
            f" | lr {f('lr', '.2e')} | tok/s {f('tokens_per_s', ',.0f')} ({f('tokens_per_s_per_gpu', ',.0f')}/gpu)"
            f" | {f('tflops_per_gpu', '.4g')} TFLOP/s/gpu | MFU {f('mfu_pct', '.2f', '%')}"
            f" | mem {f('max_memory_gb', '.2f', ' GB')} | load max/mean {f('load_max_over_mean', '.2f')}"
            f" | dropped {f('dropped_pct', '.2f', '%')}")


class Trainer:
    """One optimizer step and one validation pass of the engine ``piper_ds.initialize`` built: a PiperEngine
    (pp 1: forward / backward / step per micro-batch) or the pipeline engine (pp > 1: ``train_batch``), for the
    reference model of the ds_config or a Hugging Face model (``--hf-model``). ``seq_len``, ``vocab_size`` and
    ``flops_per_token`` describe the model trained."""

    def __init__(self, args, ds_config, piper):
        ckpt = "activation_checkpointing" in ds_config  # DeepSpeed's block is our recompute switch
        self.pipelined = piper.parallel.pp_size > 1
        self.hf_dir = args.hf_model
        if self.hf_dir is not None:
            self._build_hf(args, piper, ckpt)
        elif piper.model is None:
            raise SystemExit(f'{args.deepspeed_config}: examples/train.py needs a "piper": {{"model": ...}} block '
                             "(or --hf-model DIR)")
        else:
            self._build_reference(args, ds_config, piper, ckpt)
        # the ds_config goes as a dict (command-line overrides applied), so args must not name it a second time
        no_config = argparse.Namespace(**{**vars(args), "deepspeed_config": None})
        self.engine, _, _, _ = piper_ds.initialize(args=no_config, model=self.model, config=ds_config)
        self.optimizer_marks: List = []  # (start, end) of every engine.step() of the current optimizer step
        # the rank whose data this rank trains on: stages of one pipeline read the same micro-batches
        self.data_rank = self.engine.grid.get_data_parallel_rank() if self.pipelined else None

    def _build_reference(self, args, ds_config, piper, ckpt: bool) -> None:
        """The reference model of the ds_config's "piper.model" block (a pipeline module under pp > 1)."""
        from piper_ds.models import build_model
        spec = piper.model
        self.seq_len, self.vocab_size = spec.seq_len, spec.vocab_size
        self.flops_per_token = spec.mfu_flops_per_token()
        if self.pipelined:
            from piper_ds.pipeline.model import PiperDualPipeVModule, PiperPipelineModule
            if args.stock_moe:
                raise SystemExit("--stock-moe runs pp = 1 layouts only")
            from piper_ds.runtime.startup import init_distributed
            init_distributed(piper.runtime)  # the pipeline module needs the process group
            cls = PiperDualPipeVModule if piper.pipeline.stages_per_rank == 2 else PiperPipelineModule
            # DeepSpeed's "activation_checkpointing" block is our switch: every layer recomputes in backward
            self.model = cls(spec, piper.moe_for_model(), ep_size=piper.parallel.ep_size,
                             num_stages=piper.parallel.pp_size,
                             micro_batch=ds_config["train_micro_batch_size_per_gpu"],
                             seed=args.seed, activation_checkpoint_interval=1 if ckpt else 0)
        else:  # the model recomputes each block in backward under activation checkpointing
            self.model = build_model(spec, piper.moe_for_model(), ep_size=piper.parallel.ep_size,
                                     stock_moe=args.stock_moe, seed=args.seed, activation_checkpointing=ckpt)

    def _build_hf(self, args, piper, activation_checkpointing: bool) -> None:
        """The Hugging Face model of ``--hf-model``, each rank holding its experts only (fp32: DeepSpeed casts it
        as the ds_config says)."""
        if self.pipelined or args.stock_moe:
            raise SystemExit("--hf-model trains pp = 1 layouts on PiperMoE only (no pp_size > 1, no --stock-moe)")
        if piper.model is not None:
            raise SystemExit(f'--hf-model: the model comes from {args.hf_model}; remove the "piper.model" block of '
                             f"{args.deepspeed_config}")
        from piper_ds.integrations.hf import load
        from piper_ds.runtime.startup import init_distributed
        init_distributed(piper.runtime)  # each rank loads its own experts
        self.model = load(args.hf_model, ep_size=piper.parallel.ep_size, config=piper.moe, dtype=torch.float32)
        if activation_checkpointing:
            self.model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        limit = self.model.config.max_position_embeddings
        self.seq_len = args.seq_len or min(1024, limit)
        if self.seq_len > limit:
            raise SystemExit(f"--seq-len {self.seq_len} exceeds the model's max_position_embeddings ({limit})")
        self.vocab_size = self.model.config.vocab_size
        self.flops_per_token = self.model.flops_per_token(self.seq_len)

    def make_data(self, path, micro: int, dc):
        """The batch source: bytes for the reference model, the model's tokenizer for a Hugging Face model."""
        from piper_ds.data import make_batches, make_text_batches
        if self.hf_dir is None:
            return make_batches(path, self.vocab_size, self.seq_len, micro, dc.seed, dc.val_fraction, dc.max_bytes)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        return make_text_batches(path, lambda text: tokenizer.encode(text, add_special_tokens=False),
                                 self.vocab_size, self.seq_len, micro, dc.seed, dc.val_fraction, dc.max_bytes)

    def losses(self, x: torch.Tensor, y: torch.Tensor, aux: bool = True):
        """(LM loss, aux loss with its coefficient or None) of one micro-batch through the engine."""
        if self.hf_dir is None:
            logits, aux_loss = self.engine(x)
            return self.model.loss(logits, y), aux_loss
        from piper_ds.models import MoETransformer
        has_aux = aux and self.model.architecture.has_aux_loss
        out = self.engine(input_ids=x, output_router_logits=has_aux, use_cache=False)  # training: no KV cache
        return MoETransformer.loss(out.logits, y), self.model.aux_loss_coef * out.aux_loss if has_aux else None

    def data_index(self, rank: int) -> int:
        return rank if self.data_rank is None else self.data_rank

    def step(self, data, step: int, rank: int, gas: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One optimizer step over ``gas`` micro-batches: (mean LM loss, mean aux loss), or under pp > 1 (the
        pipeline's loss, None)."""
        engine, dev, r = self.engine, self.engine.device, self.data_index(rank)
        if self.pipelined:
            batches = ((x.to(dev), y.to(dev)) for x, y in (data.get("train", step, i, r) for i in range(gas)))
            return engine.train_batch(batches).detach().double(), None
        lm_sum = torch.zeros((), dtype=torch.float64, device=dev)
        aux_sum = torch.zeros_like(lm_sum)
        has_aux = False
        for i in range(gas):
            x, y = (t.to(dev) for t in data.get("train", step, i, r))
            lm, aux = self.losses(x, y)
            engine.backward(lm if aux is None else lm + aux)
            start = self._mark()
            engine.step()
            self.optimizer_marks.append((start, self._mark()))
            lm_sum += lm.detach().double()
            if aux is not None:
                aux_sum += aux.detach().double()
                has_aux = True
        return lm_sum / gas, aux_sum / gas if has_aux else None

    def _mark(self):
        if self.engine.device.type != "cuda":
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def optimizer_seconds(self) -> Optional[float]:
        """Seconds spent in engine.step() during the last optimizer step (read after the step synchronized;
        None under pp > 1, where the pipeline engine steps inside train_batch)."""
        marks, self.optimizer_marks = self.optimizer_marks, []
        if self.pipelined:
            return None
        if self.engine.device.type != "cuda":
            return sum(b - a for a, b in marks)
        return sum(a.elapsed_time(b) for a, b in marks) / 1e3

    @torch.no_grad()
    def validate(self, data, step: int, rank: int, batches: int) -> float:
        """Mean validation loss over ``batches`` micro-batches per rank and all ranks (pp 1: LM loss, no aux;
        pp > 1: the pipeline's loss)."""
        engine, dev, r = self.engine, self.engine.device, self.data_index(rank)
        if self.pipelined:
            it = ((x.to(dev), y.to(dev)) for x, y in (data.get("val", step, i, r) for i in range(batches)))
            return all_mean([float(engine.eval_batch(it, num_micro_batches=batches))], dev)[0]
        engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for i in range(batches):
            x, y = (t.to(dev) for t in data.get("val", step, i, r))
            total += self.losses(x, y, aux=False)[0].double()
        engine.train()
        return all_mean([float(total) / batches], dev)[0]

    def export(self, path: str) -> None:
        """--hf-export: the trained Hugging Face model and its tokenizer (collective; rank 0 writes)."""
        import deepspeed.comm as dist
        from piper_ds.integrations.hf import export
        export(self.engine.module, path)
        if dist.get_rank() == 0:
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(self.hf_dir).save_pretrained(path)

    def metrics(self, histograms: bool) -> Dict[str, float]:
        """Expert-load and router-loss metrics of the engine (under pp > 1 the aux loss comes from here)."""
        return self.engine.collect_expert_load(histograms=histograms)

    def write(self, metrics: Dict[str, float]) -> None:
        from piper_ds.tracking.monitor import write_scalars
        write_scalars(self.engine.monitor, metrics, self.engine.global_samples)


def load_config(args) -> Tuple[Dict, object]:
    """The ds_config of ``--deepspeed_config`` with the command line's overrides, and its parsed "piper" block."""
    from piper_ds.config import load_ds_config, parse_piper_config
    if args.deepspeed_config is None:
        raise SystemExit("--deepspeed_config <path> is required")
    if args.hf_model is None and (args.hf_export or args.seq_len):
        raise SystemExit("--hf-export and --seq-len go with --hf-model")
    ds_config = load_ds_config(args.deepspeed_config)
    if args.deepspeed_logs:
        block = ds_config.setdefault("piper", {})
        block["runtime"] = {**block.get("runtime", {}), "quiet_deepspeed": False}
    piper = parse_piper_config(ds_config)
    if args.save_dir is None:
        args.save_dir = piper.checkpoint.save_dir
    if args.resume and not args.save_dir:
        raise SystemExit("--resume needs --save-dir (or piper.checkpoint.save_dir)")
    return ds_config, piper


def main(argv=None) -> int:
    """Trains as the command line says; returns the exit code (0, or 3 when the divergence guard stopped)."""
    setup_env()  # before parsing: --local_rank defaults to LOCAL_RANK, which srun only gives as SLURM_LOCALID
    args = parse_args(argv)
    import deepspeed.comm as dist
    from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine

    from piper_ds.runtime.divergence import DivergenceError

    ds_config, piper = load_config(args)
    trainer = Trainer(args, ds_config, piper)
    engine = trainer.engine
    dc = piper.data
    data = trainer.make_data(args.data if args.data is not None else dc.path, engine.train_micro_batch_size_per_gpu(),
                             dc)
    if args.resume:
        path, _ = engine.load_checkpoint(args.save_dir, tag=None if args.resume == "auto" else args.resume)
        if path is None:
            raise SystemExit(f"--resume: no checkpoint found in {args.save_dir!r}")
    val_interval = dc.val_interval if args.val_interval is None else args.val_interval
    least = 2 * piper.parallel.pp_size if isinstance(engine, DualPipeVEngine) else 1
    if val_interval and dc.val_batches < least:
        raise SystemExit(f"DualPipeV evaluates at least 2 x pp ({least}) micro-batches per validation pass, "
                         f"piper.data.val_batches is {dc.val_batches}: raise it or pass --val-interval 0")
    run = Run(args, piper, trainer, data, val_interval, dist.get_rank(), dist.get_world_size())
    try:
        run.train()
        stopped = None
    except DivergenceError as err:  # raised on every rank at the same step
        stopped = err
    run.bar.close()
    if stopped is None and args.save_dir and (not args.save_interval or engine.global_steps % args.save_interval):
        engine.save_checkpoint(args.save_dir)
    if stopped is None and args.hf_export:
        trainer.export(args.hf_export)
    summary = summarize(run.tput, run.history, args, engine, run.optimizer_s)
    summary.update(skipped_steps=engine.divergence.skipped, stopped="diverged" if stopped else None)
    if run.rank == 0 and args.metrics_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.metrics_out)), exist_ok=True)
        with open(args.metrics_out, "w") as f:
            json.dump(summary, f, indent=2)
    piper_ds.shutdown(engine)
    if stopped is not None:
        if run.rank == 0:
            print(f"[piper_ds] {stopped}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    return 0


class Run:
    """The training loop of :func:`main`: steps, metric lines, validation and periodic checkpoints."""

    def __init__(self, args, piper, trainer: Trainer, data, val_interval: int, rank: int, world: int):
        from tqdm import tqdm

        from piper_ds.tracking import Throughput
        self.args, self.piper, self.trainer, self.data, self.val_interval = args, piper, trainer, data, val_interval
        self.engine, self.rank, self.world = trainer.engine, rank, world
        self.tput = Throughput(self.engine.train_batch_size() * trainer.seq_len, trainer.flops_per_token, world,
                               piper.tracking.peak_tflops)
        self.history: List[Dict[str, float]] = []
        self.optimizer_s: List[Optional[float]] = []  # seconds in engine.step() per optimizer step
        self.start = self.engine.global_steps
        self.bar = tqdm(total=args.steps, initial=self.start, disable=rank != 0, desc="train", mininterval=2.0,
                        file=sys.stderr)

    def train(self) -> None:
        """Steps until ``--steps`` (DivergenceError when the divergence guard stops the run)."""
        args, engine, trainer = self.args, self.engine, self.trainer
        gas, dc = engine.gradient_accumulation_steps(), self.piper.data
        print_every, hist_every = engine.steps_per_print(), self.piper.tracking.expert_load_interval
        lm_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        aux_sum, summed, has_aux = torch.zeros_like(lm_sum), 0, False
        for step in range(self.start, args.steps):
            self.tput.start()
            lm, aux = trainer.step(self.data, step, self.rank, gas)
            lm_sum += lm
            if aux is not None:
                aux_sum += aux
                has_aux = True
            summed += 1
            self.tput.stop()
            self.optimizer_s.append(trainer.optimizer_seconds())
            done = step + 1
            self.bar.update(1)
            hist = hist_every > 0 and done % hist_every == 0
            if done == self.start + 1 or done % print_every == 0 or done == args.steps or hist:
                self.report(done, float(lm_sum) / summed, float(aux_sum) / summed if has_aux else None, hist)
                lm_sum.zero_(), aux_sum.zero_()
                summed, has_aux = 0, False
            if self.val_interval and (done % self.val_interval == 0 or done == args.steps):
                v = trainer.validate(self.data, done, self.rank, dc.val_batches)
                trainer.write({"val_loss": v})
                self.history.append({"step": done, "val_loss": v})
                if self.rank == 0:
                    self.bar.write(f"step {done:>6} | validation loss {v:.4f}")
            if args.save_dir and args.save_interval and done % args.save_interval == 0:
                engine.save_checkpoint(args.save_dir)

    def report(self, done: int, loss: float, aux_loss: Optional[float], hist: bool) -> None:
        """One metrics line (rank 0), the same metrics to the monitor and the history. A NaN loss stays NaN."""
        from piper_ds.tracking import peak_memory_gb
        engine = self.engine
        engine.divergence.flush()
        loss, aux = all_mean([loss, aux_loss if aux_loss is not None else 0.0], engine.device)
        gnorm = engine.get_global_grad_norm()
        m = {"loss": loss, "lr": engine.get_lr()[0], "grad_norm": float(gnorm) if gnorm is not None else None,
             "skipped_steps": engine.divergence.skipped, "max_memory_gb": all_max(peak_memory_gb(), engine.device),
             **self.tput.window(), **self.trainer.metrics(histograms=hist)}
        if aux_loss is not None:  # the aux loss trained on (a Hugging Face model's own) over the engine's (pp > 1)
            m["aux_loss"] = aux
        self.trainer.write(m)
        self.history.append({"step": done, **{k: v for k, v in m.items() if v is not None}})
        if self.rank == 0:
            self.bar.write(format_line(done, m))


def summarize(tput, history, args, engine, optimizer_s) -> Dict[str, float]:
    """The --metrics-out JSON: medians after warm-up (the step, and its optimizer step and forward + backward
    apart), peak memory (max over ranks), losses and the config."""
    from piper_ds.tracking import peak_memory_gb
    s = tput.summary(args.warmup_steps)
    timed = [o for o in optimizer_s[args.warmup_steps:] or optimizer_s if o is not None]
    if timed and "median_step_time_s" in s:
        s["median_optimizer_step_s"] = statistics.median(timed)
        s["median_forward_backward_s"] = s["median_step_time_s"] - s["median_optimizer_step_s"]
    s["peak_memory_gb"] = all_max(peak_memory_gb(), engine.device)
    losses = [h["loss"] for h in history if "loss" in h]
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    s.update({"first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
              "final_val_loss": vals[-1] if vals else None, "steps": engine.global_steps,
              "world_size": tput.world_size, "tokens_per_step": tput.tokens_per_step,
              "flops_per_token": tput.flops_per_token, "peak_tflops": tput.peak_tflops,
              "stock_moe": args.stock_moe, "hf_model": args.hf_model, "deepspeed_config": args.deepspeed_config,
              "history": history})
    return s


if __name__ == "__main__":
    sys.exit(run_main(main))
