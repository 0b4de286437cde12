"""The planner's output: a complete ds_config for a layout, and the command that launches it.

The JSON holds DeepSpeed's own blocks (batch split, bf16, ZeRO, optimizer, pipeline), the ``"piper"`` block
(``model``: every :class:`ModelSpec` field; ``moe``: the routing recipe and the all-to-all, validated with
the rest of the block when the job starts; ``parallel``: ep_size and pp_size; ``optimizer``: the ZeRO step,
``fused_step`` "auto" or, for a layout with ``fused_step`` False, "off"; ``pipeline``: the schedule;
``topology``: gpus_per_node; ``tracking``: the MFU peak) and a ``"piper_plan"`` block recording the layout
and the prediction, so that a measured run can be set beside it. DeepSpeed keeps unknown top-level keys, so
both ride along.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from piper_ds.planner.cluster import GIB, ClusterSpec
from piper_ds.planner.resources import Estimate
from piper_ds.system.layout import Layout
from piper_ds.system.pipeline import PipelineConfig
from piper_ds.system.specs import ModelSpec

#: Routing options that belong to a preset's published recipe (everything else: the MoE layer's defaults).
MOE_RECIPES: Dict[str, Dict[str, Any]] = {
    "deepseek-v3": dict(score_func="sigmoid", n_groups=8, topk_groups=4, routed_scaling_factor=2.5,
                        aux_loss_coef=1e-4, bias_update_rate=1e-3),
    "qwen3-30b-a3b": dict(aux_loss_coef=1e-3),
    "mixtral-8x7b": dict(aux_loss_coef=0.02),
}

TRAIN_SCRIPT = "examples/train.py"


def moe_block(model: ModelSpec, layout: Layout) -> Dict[str, Any]:
    """The ``"piper.moe"`` block: the preset's routing recipe and the layout's all-to-all as ``transport``.

    The architecture (top_k, activation, shared experts) comes from the ``"piper.model"`` block, so it is not
    repeated here; the runtime validates the block (``piper_ds.config.parse_piper_config``)."""
    return {**MOE_RECIPES.get(model.name, {}), "transport": layout.a2a}


def build_ds_config(model: ModelSpec, layout: Layout, est: Optional[Estimate] = None, *, lr: float = 3e-4,
                    steps_per_print: int = 10, cluster: Optional[ClusterSpec] = None) -> Dict[str, Any]:
    """A ds_config dict for ``layout`` (batch sizes per DeepSpeed's rule train = micro * accum * dp).

    ``cluster`` (default: the estimate's) fills ``piper.topology.gpus_per_node`` (the job's GPUs when they fit
    in one node) and the MFU peak. The optimizer is torch's AdamW (``"torch_adam": true``), fused or foreach as
    the layout's ``fused_optimizer`` says: no kernel to build at start-up; at ZeRO-1/2 the engines run it
    through their fused step (``piper.optimizer.fused_step`` "auto", which this config allows) unless the
    layout's ``fused_step`` is False ("off": DeepSpeed's own step).
    """
    cluster = cluster or (est.cluster if est is not None else None)
    cfg: Dict[str, Any] = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "steps_per_print": steps_per_print,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW",
                      "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                 "torch_adam": True, "fused": layout.fused_optimizer}},
        "bf16": {"enabled": layout.precision == "bf16"},
        "zero_optimization": {"stage": layout.zero_stage, "overlap_comm": layout.zero_stage > 0,
                              "contiguous_gradients": True, "reduce_scatter": True},
        "wall_clock_breakdown": False,
    }
    if layout.pp > 1:
        cfg["pipeline"] = {"use_reentrant": False}
    if layout.activation_checkpointing:
        cfg["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False}
    cfg["piper"] = {
        "model": model.to_block(),
        "moe": moe_block(model, layout),
        "parallel": {"ep_size": layout.ep, "pp_size": layout.pp},
        "optimizer": {"fused_step": "auto" if layout.fused_step else "off"},
    }
    if layout.pp > 1:
        cfg["piper"]["pipeline"] = PipelineConfig(schedule=layout.schedule,
                                                  virtual_stages=layout.virtual_stages).model_dump()
    if cluster is not None:
        cfg["piper"]["topology"] = {"gpus_per_node": gpus_per_node(cluster, layout)}
        cfg["piper"]["tracking"] = {"peak_tflops": cluster.peak_tflops}
    cfg["piper_plan"] = plan_block(layout, est)
    return cfg


def gpus_per_node(cluster: ClusterSpec, layout: Layout) -> int:
    """Ranks per node of the job: the cluster's node, or the job's GPUs when they fit in one node."""
    return min(cluster.gpus_per_node, layout.gpus)


def plan_block(layout: Layout, est: Optional[Estimate]) -> Dict[str, Any]:
    """The ``"piper_plan"`` record: the layout and, when given, the prediction (GiB, seconds)."""
    out: Dict[str, Any] = {"layout": layout.model_dump(mode="json"), "gpus": layout.gpus}
    if est is not None:
        out["cluster"] = est.cluster.name
        out["predicted"] = {
            "step_time_s": round(est.step_time, 6),
            "tokens_per_s": round(est.tokens_per_s, 1),
            "tflops_per_gpu": round(est.tflops_per_gpu, 2),
            "mfu": round(est.mfu, 4),
            "worst_stage": est.worst.stage,
            "worst_stage_gib": round(est.worst.total / GIB, 3),
            "stage_memory_gib": [round(m.total / GIB, 3) for m in est.memory],
            "step_breakdown_s": {k: round(v, 6) for k, v in est.step_parts.items()},
        }
    return out


def write_json(obj: Any, path: str, indent: int = 2) -> None:
    """Writes ``obj`` as indented JSON with a final newline, creating the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_ds_config(cfg: Dict[str, Any], path: str) -> None:
    """Writes ``cfg`` as indented JSON, creating the folder."""
    write_json(cfg, path)


def launch_command(layout: Layout, gpus_per_node: int, config_path: str) -> str:
    """The exact launcher command for the written config (hostfile form across nodes)."""
    if layout.gpus <= gpus_per_node:
        return f"deepspeed --num_gpus {layout.gpus} {TRAIN_SCRIPT} --deepspeed_config {config_path}"
    nodes = -(-layout.gpus // gpus_per_node)
    return (f"deepspeed --hostfile hostfile --num_nodes {nodes} --num_gpus {gpus_per_node} {TRAIN_SCRIPT} "
            f"--deepspeed_config {config_path}")
