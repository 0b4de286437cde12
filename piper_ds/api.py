"""``piper_ds.initialize`` and ``piper_ds.shutdown``: deepspeed.initialize's signature, a PiperEngine inside."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT

from piper_ds.config import load_ds_config, parse_piper_config


def initialize(args: Any = None,
               model: torch.nn.Module = None,
               optimizer: Optional[Union[torch.optim.Optimizer, Callable]] = None,
               model_parameters: Optional[Any] = None,
               training_data: Optional[torch.utils.data.Dataset] = None,
               lr_scheduler: Optional[Union[Any, Callable]] = None,
               distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT,
               mpu: Any = None,
               dist_init_required: Optional[bool] = None,
               collate_fn: Optional[Callable] = None,
               config: Optional[Union[str, Dict[str, Any]]] = None,
               mesh_param: Any = None,
               config_params: Optional[Union[str, Dict[str, Any]]] = None) -> Tuple[Any, Any, Any, Any]:
    """Like ``deepspeed.initialize`` (same arguments, same return tuple) but returns a
    :class:`piper_ds.engine.PiperEngine`.

    The ds_config comes from ``config`` (dict or JSON path), ``config_params`` or ``args.deepspeed_config``;
    its ``"piper"`` block is validated (unknown keys are errors) and DeepSpeed's own keys are linted
    (:func:`piper_ds.config_lint.lint_ds_config`: typos are errors with a suggestion). The process group starts
    with ``piper.runtime.timeout_s`` as its timeout. Before DeepSpeed builds anything it checks
    batch sizes, ep_size against the world size and the ZeRO stage with MoE layers; every problem is a
    ValueError that names the values. A ``PipelineModule`` or ``piper.parallel.pp_size > 1`` gets a
    :class:`piper_ds.pipeline.engine.PiperPipelineEngine` instead. Not supported (ValueError): ``mesh_param``
    or sequence parallelism, AutoTP, the hybrid engine.

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)``.
    """
    if model is None:
        raise ValueError("piper_ds.initialize requires a model")
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.config import DeepSpeedConfig

    from piper_ds.config_lint import lint_ds_config
    from piper_ds.engine import PiperEngine, check_batch_sizes, check_setup
    from piper_ds.runtime.startup import init_distributed, quiet_deepspeed

    ds_config = load_ds_config(_resolve_config(args, config, config_params))
    piper = parse_piper_config(ds_config)
    if piper.runtime.lint_ds_config:
        lint_ds_config(ds_config)
    init_distributed(piper.runtime, dist_init_required=dist_init_required, distributed_port=distributed_port)
    if isinstance(model, PipelineModule) or piper.parallel.pp_size > 1:
        from piper_ds.pipeline.engine import initialize_pipeline  # pp > 1: PiperPipelineEngine
        return initialize_pipeline(args, model, optimizer, model_parameters, training_data, lr_scheduler,
                                   config=ds_config, collate_fn=collate_fn, dist_init_required=dist_init_required,
                                   piper_config=piper)
    _reject_unsupported(ds_config, mesh_param)
    world = dist.get_world_size()
    dp_world = mpu.get_data_parallel_world_size() if mpu is not None else world
    check_batch_sizes(ds_config, dp_world)
    check_setup(model, ds_config, piper, world)

    deepspeed.zero.partition_parameters.shutdown_init_context()
    config_class = DeepSpeedConfig(ds_config, mpu)
    deepspeed.set_optimizer_flags(config_class, model)
    if config_class.hybrid_engine.enabled:
        raise ValueError('"hybrid_engine" is enabled in the ds_config; PiperEngine does not support it')
    with quiet_deepspeed(piper.runtime.quiet_deepspeed):
        engine = PiperEngine(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                             training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                             dist_init_required=dist_init_required, collate_fn=collate_fn, config=ds_config,
                             config_class=config_class, piper_config=piper)
    deepspeed.zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _resolve_config(args: Any, config: Any, config_params: Any) -> Any:
    """The one ds_config given through ``config``, ``config_params`` or ``args.deepspeed_config``."""
    if config is None and config_params is not None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None)
    if from_args is None:
        from_args = getattr(args, "deepscale_config", None)
    if from_args is not None:
        if config is not None:
            raise ValueError(f"a ds_config was given twice: args.deepspeed_config ({from_args!r}) and config; "
                             "pass only one")
        config = from_args
    if config is None:
        raise ValueError("no ds_config: pass config=<dict or path> or --deepspeed_config <path>")
    return config


def _reject_unsupported(ds_config: Dict[str, Any], mesh_param: Any) -> None:
    if mesh_param is not None:
        raise ValueError(f"mesh_param ({mesh_param!r}) is not supported by PiperEngine")
    sp = ds_config.get("sequence_parallel_size", 1)
    if sp != 1:
        raise ValueError(f"sequence_parallel_size ({sp}) is not supported by PiperEngine; use 1")
    autotp = (ds_config.get("tensor_parallel") or {}).get("autotp_size", 0)
    if autotp and autotp > 1:
        raise ValueError(f"tensor_parallel.autotp_size ({autotp}) is not supported by PiperEngine")


def shutdown(engine: Any = None) -> None:
    """Ends a run cleanly: ``engine.destroy()``, the W&B run finished (rank 0), a barrier, this rank's segment of
    DeepSpeed's CPU all-reduce unlinked (:mod:`piper_ds.runtime.shm`: DeepSpeed leaves it in /dev/shm), then the
    process group is destroyed (without this gloo may abort at interpreter exit). Safe when nothing is
    initialised."""
    from deepspeed import comm as dist
    if engine is not None:
        wandb_monitor = getattr(getattr(engine, "monitor", None), "wandb_monitor", None)
        engine.destroy()
        if wandb_monitor is not None:  # flush and close the run (spawned workers skip atexit hooks)
            import wandb
            wandb.finish()
    if dist.is_initialized():
        dist.barrier()  # every rank has mapped its peers' all-reduce segments: this rank's name can go
        import os
        from piper_ds.runtime.shm import unlink_allreduce_buffers
        unlink_allreduce_buffers(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                 int(os.environ.get("MASTER_PORT", TORCH_DISTRIBUTED_DEFAULT_PORT)),
                                 [dist.get_rank()])
        dist.destroy_process_group()


def env_from_slurm(environ: Dict[str, str]) -> Dict[str, str]:
    """The torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) for a process started by SLURM ``srun``, from its ``SLURM_*`` variables; {} when not under
    srun or when RANK is already set (deepspeed launcher, torchrun). MASTER_ADDR is the first host of
    SLURM_JOB_NODELIST (``node[03-05,9],gpu7`` -> ``node03``); MASTER_PORT defaults to 29500."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
           "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
           "MASTER_PORT": environ.get("MASTER_PORT", str(TORCH_DISTRIBUTED_DEFAULT_PORT))}
    tasks_per_node = environ.get("SLURM_NTASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", ""))
    first = tasks_per_node.split(",")[0].split("(")[0]
    if first.isdigit():
        env["LOCAL_WORLD_SIZE"] = first
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or _first_host(environ.get("SLURM_JOB_NODELIST",
                                                                               environ.get("SLURM_NODELIST", "")))
    return env


def _first_host(nodelist: str) -> str:
    """First host name of a SLURM node list: ``a[01-03,7],b`` -> ``a01``; ``""`` -> ``127.0.0.1``."""
    if not nodelist:
        return "127.0.0.1"
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0] + "]"
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]
