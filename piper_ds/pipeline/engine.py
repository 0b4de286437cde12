"""PiperPipelineEngine: DeepSpeed's ``PipelineEngine`` for pipelined MoE (pp x dp x ep, ZeRO-0/1).

What it adds to ``PipelineEngine``:

* validates the (pp, dp, ep) mesh before DeepSpeed builds anything (:class:`~piper_ds.pipeline.groups.MeshLayout`)
  and checks after init that DeepSpeed's EP / expert-DP / DP groups are that mesh;
* splits the optimizer parameter groups into dense and MoE groups
  (``split_params_into_different_moe_groups_for_optimizer``) so ZeRO-1 shards expert state over expert-DP;
* runs the schedule named by ``schedule``: '1f1b' (DeepSpeed's TrainSchedule) or 'overlap' (two half
  micro-batches per stage on two CUDA streams, see :mod:`piper_ds.pipeline.schedules`); 'dualpipev' runs on
  :class:`PiperDualPipeVEngine`, the same additions on DeepSpeed's ``DualPipeVEngine``. All by overriding
  ``_train_schedule`` and extending ``_INSTRUCTION_MAP`` (DeepSpeed's DualPipeVEngine pattern);
* after each applied optimizer step, updates every PiperMoE's selection bias (aux-loss-free balancing), then
  calls the balance controller (:mod:`piper_ds.balance`: per-window rank loads of the stage's layers, gathered
  over the pipeline for the monitor; expert migration inside the stage);
* counts expert load and router losses per MoE layer of the stage (forward hooks) and reports them for the
  whole pipeline (:meth:`PiperPipelineEngine.collect_expert_load`), as PiperEngine does at pp = 1;
* checkpoints atomically (experts by global id), resumes verified, also under another world, dp or EP size,
  runs a heartbeat watchdog and a divergence guard (:class:`piper_ds.runtime.guards.RuntimeGuards`);
* optionally records a timeline (:class:`~piper_ds.pipeline.timeline.TimelineRecorder`) of every instruction
  and every all-to-all.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine, DualPipeVModule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule

from piper_ds.balance import BalanceController
from piper_ds.config import load_ds_config, parse_piper_config, zero_stage
from piper_ds.moe import PiperMoE
from piper_ds.pipeline.groups import MeshLayout, check_groups
from piper_ds.pipeline.schedules import OverlapBackwardPass, OverlapForwardPass, make_schedule
from piper_ds.runtime.guards import RuntimeGuards
from piper_ds.runtime.zero_step import FusedZeroStep
from piper_ds.system.deepspeed_rules import MOE_GROUP_MAX_NUMEL, greedy_groups
from piper_ds.tracking.expert_load import ExpertLoadCounter, mean_router_losses
from piper_ds.tracking.monitor import log_expert_histograms


def mesh_of(model: PipelineModule, ds_config: Dict[str, Any], world_size: int,
            gpus_per_node: Optional[int] = None, allow_cross_node_ep: bool = False) -> MeshLayout:
    """The validated mesh of ``model`` (its stages and its MoE layers' ep_size) under ``ds_config``."""
    eps = sorted({m.ep_size for m in model.modules() if isinstance(m, MoE)})
    if len(eps) > 1:
        raise ValueError(f"MoE layers of one pipeline use different ep_size values {eps}; use one")
    spec = getattr(model, "spec", None)
    return MeshLayout(world_size=world_size, pp=model.topology().get_dim("pipe"), ep=eps[0] if eps else 1,
                      gpus_per_node=gpus_per_node, zero_stage=zero_stage(ds_config),
                      n_blocks=spec.n_layers if spec is not None else None,
                      num_experts=spec.num_experts if spec is not None else None,
                      allow_cross_node_ep=allow_cross_node_ep)


def _greedy(params: List[torch.nn.Parameter], max_numel: int) -> List[List[torch.nn.Parameter]]:
    """DeepSpeed's cut (:func:`piper_ds.system.deepspeed_rules.greedy_groups`) applied to ``params``."""
    return [[params[i] for i in group] for group in greedy_groups([p.numel() for p in params], max_numel)]


def _chunks(params: List[torch.nn.Parameter], max_numel: int, count: int) -> List[List[torch.nn.Parameter]]:
    """``params`` in order, cut into exactly ``count`` non-empty consecutive chunks: the greedy cut at
    ``max_numel`` elements, or at the smallest larger cap that gives at most ``count`` chunks, then the chunk
    with the most tensors halved until there are ``count``."""
    if not 1 <= count <= len(params):
        raise ValueError(f"cannot cut {len(params)} parameter tensors into {count} non-empty optimizer groups")
    out = _greedy(params, max_numel)
    if len(out) > count:  # merge: the smallest cap that needs no more than `count` chunks
        low, high = max_numel, sum(p.numel() for p in params)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if len(_greedy(params, mid)) <= count else (mid + 1, high)
        out = _greedy(params, low)
    while len(out) < count:
        i = max(range(len(out)), key=lambda j: len(out[j]))
        half = len(out[i]) // 2
        out[i:i + 1] = [out[i][:half], out[i][half:]]
    return out


def moe_param_groups(model: torch.nn.Module, pipe_group=None, max_group_numel: Optional[int] = None) -> list:
    """Trainable parameters in one dense group and, per EP group name, MoE groups of at most
    ``max_group_numel`` elements (None: DeepSpeed's cap, :data:`MOE_GROUP_MAX_NUMEL`); each parameter exactly once.

    With ``pipe_group`` (the ranks of this rank's pipeline) every stage gets the same number of groups per name:
    ZeRO all-reduces the gradient norm over the stages once per group, so unequal counts would deadlock.
    """
    import deepspeed.comm as dist
    max_group_numel = MOE_GROUP_MAX_NUMEL if max_group_numel is None else max_group_numel
    if max_group_numel < 1:
        raise ValueError(f"max_group_numel must be >= 1, got {max_group_numel}")
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if not is_moe_param(p)]
    by_name: Dict[str, list] = {}
    for p in params:
        if is_moe_param(p):
            by_name.setdefault(p.group_name, []).append(p)
    names = sorted(by_name)
    counts = [len(_greedy(by_name[n], max_group_numel)) for n in names]
    if pipe_group is not None and dist.get_world_size(group=pipe_group) > 1:
        counts = _agree_across_stages(pipe_group, bool(dense), names, counts, [len(by_name[n]) for n in names])
    groups = [{"name": "params", "params": dense}] if dense else []
    for name, count in zip(names, counts):
        groups += [{"name": name, "moe": True, "params": chunk}
                   for chunk in _chunks(by_name[name], max_group_numel, count)]
    seen = [id(p) for g in groups for p in g["params"]]
    if sorted(seen) != sorted(id(p) for p in params) or len(seen) != len(set(seen)):
        raise ValueError(f"optimizer groups hold {len(seen)} parameter entries for {len(params)} trainable "
                         "parameters: every parameter must be in exactly one group")
    return groups


def _min_max_over(values: torch.Tensor, group) -> tuple:
    """(element-wise min, element-wise max) of ``values`` over the ranks of ``group``."""
    import deepspeed.comm as dist
    low, high = values.clone(), values.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return low, high


def _agree_across_stages(pipe_group, has_dense: bool, names: List[str], counts: List[int],
                         tensors: List[int]) -> List[int]:
    """The number of MoE groups per name that every stage of the pipeline uses: the largest greedy count of any
    stage, but no more than the fewest MoE tensors of any stage (a stage with more, larger layers then holds
    more than the cap per group). ValueError, raised on every stage, when the stages differ in having dense
    parameters or in their number of EP group names."""
    from deepspeed.accelerator import get_accelerator
    device = get_accelerator().current_device_name()
    low, high = _min_max_over(torch.tensor([int(has_dense), len(names)], dtype=torch.int64, device=device),
                              pipe_group)
    if not torch.equal(low, high):
        raise ValueError(f"pipeline stages differ in their optimizer group structure (dense parameters on some "
                         f"stages only, or different EP group names; this stage: dense={has_dense}, MoE group names "
                         f"{names}): every stage needs dense parameters and MoE layers of one ep_size")
    if not names:
        return counts
    _, most = _min_max_over(torch.tensor(counts, dtype=torch.int64, device=device), pipe_group)
    fewest, _ = _min_max_over(torch.tensor(tensors, dtype=torch.int64, device=device), pipe_group)
    return [int(c) for c in torch.minimum(most, fewest).tolist()]


class PiperPipelineEngine(RuntimeGuards, FusedZeroStep, PipelineEngine):
    """``PipelineEngine`` running a pipelined MoE model. Same constructor as ``PipelineEngine`` plus:

    Args:
        schedule: '1f1b' or 'overlap' ('dualpipev' on :class:`PiperDualPipeVEngine`).
        gpus_per_node: ranks per node for the EP locality check (None: LOCAL_WORLD_SIZE).
        allow_cross_node_ep: accept EP groups spanning nodes.
        timeline: a :class:`~piper_ds.pipeline.timeline.TimelineRecorder` or None.
    """

    def __init__(self, *args, schedule: str = "1f1b", gpus_per_node: Optional[int] = None,
                 allow_cross_node_ep: bool = False, timeline=None, **kwargs):
        import deepspeed.comm as dist
        if (schedule == "dualpipev") != isinstance(self, DualPipeVEngine):
            raise ValueError(f"schedule {schedule!r} needs {'a' if schedule == 'dualpipev' else 'no'} DualPipeV "
                             f"engine, got {type(self).__name__} (initialize_pipeline picks the engine)")
        # Attributes first: PipelineEngine.__init__ runs hooks and instructions that may look at them.
        self.piper_schedule, self.timeline = schedule, timeline
        self._gradients_pending = False
        model, config = kwargs["model"], kwargs.get("config") or {}
        if not isinstance(model, PipelineModule):
            raise ValueError(f"PiperPipelineEngine needs a PipelineModule, got {type(model).__name__}")
        self.mesh = mesh_of(model, config, dist.get_world_size(), gpus_per_node, allow_cross_node_ep)
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoE)]  # stock DeepSpeed MoE included
        self.piper_moe_layers = [m for m in self.moe_layers if isinstance(m, PiperMoE)]
        self.expert_load = ExpertLoadCounter(model)
        self.piper_config = parse_piper_config(load_ds_config(config))
        opt = kwargs.get("optimizer")
        if not isinstance(opt, torch.optim.Optimizer) and kwargs.get("model_parameters") is None:
            kwargs["model_parameters"] = moe_param_groups(model, model.mpu().get_pipe_parallel_group())
        super().__init__(*args, **kwargs)
        self._check_stage_group_counts()
        if self.moe_layers:
            check_groups(self.mesh, dist.get_rank(), self.moe_layers[0].expert_group_name)
        if schedule == "overlap" and self.micro_batch_size % 2:
            raise ValueError(f"the overlap schedule splits each micro-batch in two halves: "
                             f"train_micro_batch_size_per_gpu ({self.micro_batch_size}) must be even")
        if timeline is not None:
            timeline.attach(self)
        self.balance = BalanceController.for_engine(self, self.piper_config.balance,
                                                    self.grid.get_data_parallel_group(),
                                                    self.grid.get_pipe_parallel_group())
        self._setup_runtime(self.piper_config)

    def train_batch(self, data_iter=None):
        """DeepSpeed's train_batch (forward, backward and optimizer step of a whole batch)."""
        self._gradients_pending = True
        try:
            return super().train_batch(data_iter)
        finally:
            self._gradients_pending = False

    def at_optimizer_step_boundary(self) -> bool:
        """True when no gradient waits for an optimizer step: outside :meth:`train_batch`, and inside it once the
        optimizer step (the schedule's last instruction) has run: the moment expert migration may run."""
        return not self._gradients_pending

    def _check_stage_group_counts(self) -> None:
        """ZeRO all-reduces the gradient norm over the stages once per parameter group: unequal group counts
        (say, from a user's own optimizer groups) would hang the first step, so they fail here instead."""
        groups = getattr(self.optimizer, "bit16_groups", None)
        if groups is None or self.num_stages == 1:
            return
        low, high = _min_max_over(torch.tensor([len(groups)], dtype=torch.int64, device=self.device),
                                  self.grid.get_pipe_parallel_group())
        if int(low) != int(high):
            raise ValueError(f"pipeline stages have between {int(low)} and {int(high)} ZeRO parameter groups (stage "
                             f"{self.stage_id}: {len(groups)}); every stage needs the same number, as "
                             "piper_ds.pipeline.engine.moe_param_groups builds them")

    def collect_expert_load(self, histograms: bool = False, step: Optional[int] = None) -> Dict[str, float]:
        """:meth:`piper_ds.engine.PiperEngine.collect_expert_load` for the whole pipeline (collective: every rank
        calls it): each stage's counts summed over its data-parallel ranks, the stages' layers joined in
        pipeline-rank order, the router losses summed over the stages and averaged over the pipelines."""
        import torch.distributed as dist
        counts_LE, dropped, assigned = self.expert_load.collect(self.grid.get_data_parallel_group())
        stages = [None] * self.grid.get_pipe_parallel_world_size()
        dist.all_gather_object(stages, (counts_LE, dropped, assigned), group=self.grid.get_pipe_parallel_group())
        parts = [c for c, _, _ in stages if c is not None]
        counts_LE = torch.cat(parts) if parts else None
        if histograms and counts_LE is not None:
            log_expert_histograms(self.monitor, counts_LE, self.global_samples if step is None else step)
        return {**ExpertLoadCounter.summary(counts_LE, sum(d for _, d, _ in stages), sum(a for _, _, a in stages)),
                **mean_router_losses(self.expert_load, self.device, self.grid.get_data_parallel_world_size())}

    def destroy(self):
        """Releases the expert-load hooks, then DeepSpeed's resources."""
        self.expert_load.remove()
        super().destroy()

    def _train_schedule(self):
        return make_schedule(self.piper_schedule, self.micro_batches, self.num_stages, self.stage_id)

    # ----------------------------------------------------------------------------- instructions
    def _exec_overlap_forward(self, buffer_id: int) -> None:
        self.module.halves = 2
        try:
            PipelineEngine._exec_forward_pass(self, buffer_id)
        finally:
            self.module.halves = 1

    def _exec_overlap_backward(self, buffer_id: int) -> None:
        # Autograd replays the forward's half interleave: nodes run by creation order, on their forward stream.
        PipelineEngine._exec_backward_pass(self, buffer_id)

    def _pipeline_stages(self) -> int:
        return self.num_stages

    def _exec_optimizer_step(self, lr_kwargs=None):
        skipped = self.skipped_steps
        PipelineEngine._exec_optimizer_step(self, lr_kwargs)
        self._gradients_pending = False  # the step consumed them
        applied = self.skipped_steps == skipped
        self.balance.after_optimizer_step(self, applied)
        self._after_optimizer_step(applied)

    def _exec_schedule(self, pipe_schedule):
        if self.timeline is None:
            return super()._exec_schedule(pipe_schedule)
        self.timeline.begin_step()
        try:
            return super()._exec_schedule(pipe_schedule)
        finally:
            self.timeline.end_step()


class PiperDualPipeVEngine(PiperPipelineEngine, DualPipeVEngine):
    """:class:`PiperPipelineEngine` on DeepSpeed's ``DualPipeVEngine``: schedule 'dualpipev', two virtual stages
    per pipeline rank (a :class:`~piper_ds.pipeline.model.PiperDualPipeVModule`), micro-batches flowing out
    through the phase-0 stages and back through the phase-1 stages to the loss on rank 0. The MoE aux loss
    travels with the activations both ways. Needs gradient_accumulation_steps >= 2 pp."""


def _timed(kind: str, fn):
    """Wraps an instruction so that, with a timeline attached, its interval is recorded as ``kind``."""
    def run(self, **kwargs):
        if self.timeline is None:
            return fn(self, **kwargs)
        with self.timeline.interval(kind, buffer=kwargs.get("buffer_id")):
            return fn(self, **kwargs)
    run.__name__ = getattr(fn, "__name__", kind)
    return run


_KINDS = {ds_schedule.ForwardPass: "fwd", ds_schedule.BackwardPass: "bwd", OverlapForwardPass: "fwd",
          OverlapBackwardPass: "bwd", ds_schedule.SendActivation: "p2p", ds_schedule.RecvActivation: "p2p",
          ds_schedule.SendGrad: "p2p", ds_schedule.RecvGrad: "p2p", ds_schedule.ReduceGrads: "grad_sync",
          ds_schedule.ReduceTiedGrads: "grad_sync", ds_schedule.OptimizerStep: "optimizer",
          ds_schedule.LoadMicroBatch: "load", ds_schedule.CommitP2P: "p2p"}

PiperPipelineEngine._INSTRUCTION_MAP = {
    cls: _timed(_KINDS.get(cls, cls.__name__), fn) for cls, fn in {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.OptimizerStep: PiperPipelineEngine._exec_optimizer_step,
        OverlapForwardPass: PiperPipelineEngine._exec_overlap_forward,
        OverlapBackwardPass: PiperPipelineEngine._exec_overlap_backward,
    }.items()
}
PiperDualPipeVEngine._INSTRUCTION_MAP = {
    cls: _timed(_KINDS.get(cls, cls.__name__), fn) for cls, fn in {
        **DualPipeVEngine._INSTRUCTION_MAP,
        ds_schedule.OptimizerStep: PiperPipelineEngine._exec_optimizer_step,
    }.items()
}


def initialize_pipeline(args: Any = None, model: PipelineModule = None, optimizer=None, model_parameters=None,
                        training_data=None, lr_scheduler=None, config=None, collate_fn=None,
                        dist_init_required: Optional[bool] = None, schedule: Optional[str] = None,
                        gpus_per_node: Optional[int] = None, allow_cross_node_ep: bool = False, timeline=None,
                        piper_config=None):
    """Like ``deepspeed.initialize`` for a ``PipelineModule``; returns ``(engine, optimizer, dataloader,
    lr_scheduler)`` with a :class:`PiperPipelineEngine` (a :class:`PiperDualPipeVEngine` for schedule 'dualpipev',
    which needs a :class:`~piper_ds.pipeline.model.PiperDualPipeVModule`). ``config``: dict or JSON path (or
    ``args.deepspeed_config``). ``schedule`` None: the ds_config's ``"piper": {"pipeline": {"schedule": ...}}``
    ('1f1b' by default). The ``"piper"`` block's topology.gpus_per_node is used when ``gpus_per_node`` is None.
    ``piper_config``: the already validated ``"piper"`` block (a :class:`piper_ds.config.PiperConfig`; None:
    parsed from the ds_config here)."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    from piper_ds.config_lint import lint_ds_config
    from piper_ds.runtime.startup import init_distributed, quiet_deepspeed
    from piper_ds.system.pipeline import PipelineConfig
    if not isinstance(model, PipelineModule):
        raise ValueError(f"the pipeline engine needs a deepspeed.pipe.PipelineModule (e.g. "
                         f"piper_ds.pipeline.model.PiperPipelineModule), got {type(model).__name__}")
    pipe_ranks = model.topology().get_dim("pipe")
    if config is None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ValueError("no ds_config: pass config=<dict or path> or --deepspeed_config <path>")
    ds_config = load_ds_config(config)
    if piper_config is None:  # called directly, not through piper_ds.initialize (which did all this)
        piper = parse_piper_config(ds_config)
        if piper.runtime.lint_ds_config:
            lint_ds_config(ds_config)
        init_distributed(piper.runtime, dist_init_required=dist_init_required)
    else:
        piper = piper_config
    pp = piper.parallel.pp_size
    if "pp_size" in piper.parallel.model_fields_set and pp != pipe_ranks:
        raise ValueError(f"piper.parallel.pp_size ({pp}) differs from the PipelineModule's pipeline ranks "
                         f"({pipe_ranks})")
    if gpus_per_node is None:
        gpus_per_node = piper.topology.gpus_per_node
    schedule = (piper.pipeline if schedule is None else PipelineConfig(schedule=schedule)).schedule
    mpu = model.mpu()
    config_class = DeepSpeedConfig(ds_config, mpu)
    engine_class = _engine_class(model, schedule, config_class.gradient_accumulation_steps, pipe_ranks)
    deepspeed.set_optimizer_flags(config_class, model)
    with quiet_deepspeed(piper.runtime.quiet_deepspeed):
        engine = engine_class(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                              training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                              dist_init_required=dist_init_required, collate_fn=collate_fn, config=ds_config,
                              config_class=config_class, schedule=schedule, gpus_per_node=gpus_per_node,
                              allow_cross_node_ep=allow_cross_node_ep, timeline=timeline)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _engine_class(model: PipelineModule, schedule: str, micro_batches: int, pipe_ranks: int) -> type:
    """The engine for ``schedule`` and ``model``; ValueError naming the values when they do not go together."""
    virtual = isinstance(model, DualPipeVModule)
    if (schedule == "dualpipev") != virtual:
        raise ValueError(f"schedule {schedule!r} with a {type(model).__name__}: the 'dualpipev' schedule runs a "
                         "PiperDualPipeVModule (two virtual stages per rank), every other schedule a "
                         "PiperPipelineModule")
    if not virtual:
        return PiperPipelineEngine
    if micro_batches < 2 * pipe_ranks:
        raise ValueError(f"the 'dualpipev' schedule needs gradient_accumulation_steps >= 2 x pipeline ranks "
                         f"(2 x {pipe_ranks}), got {micro_batches}")
    return PiperDualPipeVEngine
