"""PiperEngine: DeepSpeed's engine with MoE-aware setup checks, parameter groups, balancing and metrics.

What it adds to ``DeepSpeedEngine`` (DeepSpeed 0.19.x):

* validates the setup once, before DeepSpeed builds anything: ``"piper"`` block, ep vs world size, ZeRO
  stage with MoE (ZeRO-3 is refused with a pointer to ZeRO-1/2), pipeline size, batch sizes;
* builds the optimizer parameter groups itself with ``split_params_into_different_moe_groups_for_optimizer``
  and checks that every trainable parameter is in exactly one group, expert parameters in MoE groups only;
* after every applied optimizer step calls ``update_selection_bias()`` on every PiperMoE (aux-loss-free
  balancing), then the balance controller (:mod:`piper_ds.balance`: per-window rank loads, expert migration);
* counts expert load per MoE layer (forward hooks) and writes metrics through ``engine.monitor``, so the
  ds_config's "wandb" / "csv_monitor" / "tensorboard" blocks work unchanged;
* checkpoints atomically (experts by global id), resumes verified, also under another world, dp or EP size,
  runs a heartbeat watchdog and a divergence guard (:class:`piper_ds.runtime.guards.RuntimeGuards`);
* under ZeRO-1/2 runs the fused optimizer step (:mod:`piper_ds.runtime.zero_step`, ``piper.optimizer``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.engine import DeepSpeedEngine

from piper_ds.balance import BalanceController
from piper_ds.config import PiperConfig, parse_piper_config, zero_stage
from piper_ds.moe import PiperMoE
from piper_ds.runtime.guards import RuntimeGuards
from piper_ds.runtime.zero_step import FusedZeroStep
from piper_ds.tracking.expert_load import ExpertLoadCounter, mean_router_losses
from piper_ds.tracking.monitor import log_config_to_wandb, log_expert_histograms, write_scalars


# --------------------------------------------------------------------------------------------- validation
def check_batch_sizes(ds_config: Mapping[str, Any], dp_world_size: int) -> None:
    """Raises ValueError (values named) unless the batch settings multiply out for ``dp_world_size`` ranks:
    train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * dp_world_size."""
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    tb, mb, gas = (ds_config.get(k) for k in keys)
    for key, value in zip(keys, (tb, mb, gas)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    if tb is None and mb is None:
        raise ValueError("the ds_config sets neither train_batch_size nor train_micro_batch_size_per_gpu")
    if tb is None:
        return
    per_step = (mb or 1) * (gas or 1) * dp_world_size
    ok = tb == per_step if (mb is not None and gas is not None) else tb % per_step == 0
    if not ok:
        raise ValueError(f"batch sizes do not multiply out: train_batch_size ({tb}) != "
                         f"train_micro_batch_size_per_gpu ({mb}) * gradient_accumulation_steps ({gas}) * "
                         f"data-parallel world size ({dp_world_size})")


def check_setup(model: torch.nn.Module, ds_config: Mapping[str, Any], piper: PiperConfig, world_size: int) -> None:
    """Checks pipeline size, ZeRO stage with MoE, and every MoE layer's ep_size against the world size and the
    ``"piper.parallel"`` block. Raises ValueError naming the values."""
    par = piper.parallel
    if par.pp_size != 1:
        raise ValueError(f"piper.parallel.pp_size ({par.pp_size}) > 1 needs the pipeline engine: build a "
                         "piper_ds.pipeline.model.PiperPipelineModule and call piper_ds.initialize")
    if world_size % par.ep_size:
        raise ValueError(f"piper.parallel.ep_size ({par.ep_size}) must divide the world size ({world_size})")
    moe_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    stage = zero_stage(ds_config)
    if moe_layers and stage >= 3:
        raise ValueError(f"ZeRO stage {stage} does not support MoE layers ({len(moe_layers)} found, e.g. "
                         f"{moe_layers[0][0]!r}): DeepSpeed's MoE parameters cannot be partitioned by ZeRO-3. "
                         'Use "zero_optimization": {"stage": 2} (or 1); ZeRO-1/2 shard the expert optimizer '
                         "state over the expert-data-parallel group.")
    for name, m in moe_layers:
        if world_size % m.ep_size:
            raise ValueError(f"MoE layer {name!r} has ep_size {m.ep_size}, which does not divide the world size "
                             f"({world_size})")
        if "ep_size" in par.model_fields_set and m.ep_size != par.ep_size:
            raise ValueError(f"MoE layer {name!r} was built with ep_size {m.ep_size} but piper.parallel.ep_size "
                             f"is {par.ep_size}")


# ------------------------------------------------------------------------------------------ param groups
def build_param_groups(model: torch.nn.Module, model_parameters: Optional[Iterable] = None) -> List[Dict[str, Any]]:
    """Optimizer parameter groups with expert parameters split into MoE groups (one per EP group name).

    ``model_parameters``: None (every trainable parameter of ``model``, one group), an iterable of tensors, or
    of param-group dicts (their options are kept). Empty groups are dropped. The result is checked with
    :func:`check_param_groups`.
    """
    items = [p for p in model.parameters() if p.requires_grad] if model_parameters is None else list(model_parameters)
    if items and all(isinstance(g, Mapping) for g in items):
        groups = [{**g, "name": g.get("name", f"group{i}"), "params": list(g["params"])} for i, g in enumerate(items)]
    else:
        groups = [{"name": "params", "params": items}]
    if not any(g.get("moe", False) for g in groups):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    groups = [g for g in groups if g["params"]]
    check_param_groups(model, groups)
    return groups


def check_param_groups(model: torch.nn.Module, groups: List[Mapping[str, Any]]) -> None:
    """Every trainable parameter of ``model`` in exactly one group; expert parameters (``allreduce=False``) only
    in groups marked ``moe``, and nothing else there. Raises ValueError naming the parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: Dict[int, int] = {}
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
            if is_moe_param(p) != bool(g.get("moe", False)):
                kind = "expert" if is_moe_param(p) else "non-expert"
                raise ValueError(f"{kind} parameter {names.get(id(p), '?')!r} is in param group "
                                 f"{g.get('name')!r} (moe={g.get('moe', False)}); split the groups with "
                                 "deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    twice = [names.get(i, "?") for i, c in seen.items() if c > 1]
    if missing or twice:
        raise ValueError(f"every trainable parameter must be in exactly one optimizer group: missing {missing[:5]} "
                         f"({len(missing)} in all), in several groups {twice[:5]} ({len(twice)} in all)")


# ------------------------------------------------------------------------------------------------ engine
class PiperEngine(RuntimeGuards, FusedZeroStep, DeepSpeedEngine):
    """``DeepSpeedEngine`` for MoE models built on :class:`piper_ds.moe.PiperMoE` (or stock DeepSpeed MoE).

    Same constructor as ``DeepSpeedEngine`` plus ``piper_config`` (parsed from ``config["piper"]`` when None).
    Build it through :func:`piper_ds.initialize`, which also checks batch sizes before DeepSpeed does.
    """

    def __init__(self, args, model, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
                 mpu=None, dist_init_required=None, collate_fn=None, config=None, config_class=None,
                 mesh_device=None, dont_change_device=False, piper_config: Optional[PiperConfig] = None):
        # Attributes first: DeepSpeedEngine.__init__ runs hooks that may look at them.
        import deepspeed.comm as dist
        self.piper_config = piper_config if piper_config is not None else parse_piper_config(config or {})
        self.piper_moe_layers = [m for m in model.modules() if isinstance(m, PiperMoE)]
        check_setup(model, config or {}, self.piper_config, dist.get_world_size())
        if isinstance(optimizer, torch.optim.Optimizer):
            check_param_groups(model, optimizer.param_groups)
        else:
            model_parameters = build_param_groups(model, model_parameters)
        self.expert_load = ExpertLoadCounter(model)
        self._pending_backwards = 0  # backward passes whose gradients no optimizer step has consumed yet
        super().__init__(args, model, optimizer=optimizer, model_parameters=model_parameters,
                         training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                         dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                         config_class=config_class, mesh_device=mesh_device, dont_change_device=dont_change_device)
        self._apply_topology_override()
        self.balance = BalanceController.for_engine(self, self.piper_config.balance)  # the world holds every layer
        if self.piper_config.tracking.log_config_to_wandb:
            log_config_to_wandb(self.monitor, self.config)
        self._setup_runtime(self.piper_config)

    def _apply_topology_override(self) -> None:
        """With ``piper.topology.gpus_per_node`` set, binds every PiperMoE again for that topology (DeepSpeed's
        group setup gives the layers the launcher's topology). Same order on every rank."""
        topo = self.piper_config.topology
        if topo.gpus_per_node is None or not self.piper_moe_layers:
            return
        import deepspeed.comm as dist
        from piper_ds.comm.topology import Topology
        topology = Topology.from_config(topo, dist.get_world_size())
        for layer in self.piper_moe_layers:
            layer.bind_ep_group(layer.deepspeed_moe.ep_group, layer.dp_group, topology)

    def backward(self, loss, *args, **kwargs):
        """DeepSpeed's backward (same arguments and result); counted until the optimizer step that uses it."""
        self._pending_backwards += 1
        return super().backward(loss, *args, **kwargs)

    def at_optimizer_step_boundary(self) -> bool:
        """True when no backward pass waits for an optimizer step (before the first one, or right after
        :meth:`step` ended a gradient-accumulation cycle): the moment expert migration may run."""
        return self._pending_backwards == 0

    def step(self, lr_kwargs=None):
        """DeepSpeed's step; after an applied optimizer step, every PiperMoE updates its selection bias, then the
        balance controller counts the step (every ``piper.balance.window`` steps it reports the rank loads and
        may migrate experts). After every optimizer step the divergence guard looks at it (DivergenceError
        after too many skipped)."""
        boundary = self.is_gradient_accumulation_boundary()
        skipped = self.skipped_steps
        super().step(lr_kwargs)
        if boundary:
            self._pending_backwards = 0
            applied = self.skipped_steps == skipped
            self.balance.after_optimizer_step(self, applied)
            self._after_optimizer_step(applied)

    @torch.no_grad()
    def clip_fp32_gradients(self):
        """ZeRO-0 fp32 clipping with the true global norm (DeepSpeed's averages per-rank norms, which at ep > 1
        differs from the ep = 1 norm): dense gradients are already equal on every rank; expert gradients are
        distinct across an EP group, so their squared norms are summed over it. Sets the grad norm."""
        if not self.has_moe_layers:
            return super().clip_fp32_gradients()
        import deepspeed.comm as dist
        from deepspeed.utils import groups
        params = [p for p in self.module.parameters() if p.grad is not None]
        sq = {None: torch.zeros((), dtype=torch.float32, device=self.device)}
        for p in params:
            key = p.group_name if is_moe_param(p) else None
            sq[key] = sq.get(key, torch.zeros_like(sq[None])) + p.grad.detach().float().pow(2).sum()
        for name, value in sq.items():
            group = groups._get_expert_parallel_group(name) if name is not None else None
            if name is not None and dist.get_world_size(group=group) > 1:
                dist.all_reduce(value, group=group)
        total = torch.stack(list(sq.values())).sum().sqrt()
        coef = torch.clamp(self.gradient_clipping() / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef)
        self._global_grad_norm = total.item()
        return total

    # ----------------------------------------------------------------------------------------- metrics
    def write_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None,
                      prefix: str = "Train/Samples/") -> None:
        """Writes scalar ``metrics`` through ``engine.monitor`` (rank 0 writes) at ``step`` (default: samples
        seen, the x-axis DeepSpeed uses for its own "Train/Samples/lr")."""
        write_scalars(self.monitor, metrics, self.global_samples if step is None else step, prefix)

    def collect_expert_load(self, histograms: bool = False, step: Optional[int] = None) -> Dict[str, float]:
        """Expert-load summary since the last call, summed over all ranks (collective: every rank calls it):
        ``load_max_over_mean`` (worst layer), ``load_max_over_mean_avg`` (mean over layers), ``dropped_pct``,
        and with PiperMoE layers the router losses of a micro-batch, ``aux_loss`` and ``z_loss`` (mean over
        micro-batches and ranks). With ``histograms``, each layer's per-expert counts also go to W&B /
        TensorBoard."""
        import deepspeed.comm as dist
        counts_LE, dropped, assigned = self.expert_load.collect(None)  # all ranks: every token counted once
        if histograms and counts_LE is not None:
            log_expert_histograms(self.monitor, counts_LE, self.global_samples if step is None else step)
        return {**ExpertLoadCounter.summary(counts_LE, dropped, assigned),
                **mean_router_losses(self.expert_load, self.device, dist.get_world_size())}

    def destroy(self):
        """Releases the expert-load hooks, then DeepSpeed's resources."""
        self.expert_load.remove()
        super().destroy()
