"""The ``"piper"`` block of a ds_config, validated once at the edge.

DeepSpeed keeps unknown top-level keys, so the block lives in the same JSON as DeepSpeed's own settings::

    {
      "train_micro_batch_size_per_gpu": 8,
      "zero_optimization": {"stage": 2},
      "piper": {
        "model": {"preset": "tiny", "n_shared_experts": 1},
        "moe": {"aux_loss_coef": 0.01},
        "parallel": {"ep_size": 2},
        "tracking": {"expert_load_interval": 50}
      }
    }

Every model here forbids unknown keys (``extra="forbid"``): a typo is an error, never a silent default.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from piper_ds.comm.topology import TopologyConfig  # the all-to-all's own model: one definition
from piper_ds.moe.config import MoEConfig
from piper_ds.system.migration import DEFAULT_MOE_TIME_FRACTION, DEFAULT_P2P_GBPS, DEFAULT_WINDOW
from piper_ds.system.pipeline import PipelineConfig
from piper_ds.system.specs import ModelSpec

#: Fields that both the model spec and the MoE block can set; the model spec decides, a conflict is an error.
_SHARED_WITH_MODEL = ("top_k", "activation", "n_shared_experts")


class ParallelConfig(BaseModel):
    """How the ranks are laid out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ep_size: int = Field(1, ge=1, description="Expert-parallel group size: ranks sharing one copy of the routed "
                         "experts. Must divide the world size and every layer's num_experts.")
    pp_size: int = Field(1, ge=1, description="Pipeline stages; > 1 needs a `PiperPipelineModule` (a "
                         "`PiperDualPipeVModule` for DualPipeV) and runs on the pipeline engine; examples/train.py "
                         "builds it (see pipeline.md).")


class TrackingConfig(BaseModel):
    """What PiperEngine's tracker writes through ``engine.monitor`` (W&B / CSV / TensorBoard blocks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expert_load_interval: int = Field(
        100, ge=0, description="Optimizer steps between per-layer expert-load histograms (W&B, TensorBoard); "
        "0 = never. Scalar load stats (max/mean, dropped %) are written every steps_per_print.")
    peak_tflops: float = Field(
        989.5, gt=0, description="Peak dense TFLOP/s of one accelerator used for MFU (H100/H200 bf16: 989.5).")
    log_config_to_wandb: bool = Field(
        True, description="Put the full ds_config (piper block included) into the W&B run config.")


class BalanceConfig(BaseModel):
    """Expert-load monitoring per window and expert migration between EP ranks (:mod:`piper_ds.balance`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    migration: bool = Field(
        False, description="Swap experts between EP ranks at the end of a window when the predicted saving over "
        "the next window exceeds the transfer cost. Needs PiperMoE layers with ep_size > 1. Off: the window's "
        "rank loads are still reported.")
    window: int = Field(
        DEFAULT_WINDOW, ge=1, description="Applied optimizer steps per window: loads are summed over it, written "
        "through the monitor and planned at its end.")
    threshold: float = Field(
        1.1, gt=1.0, description="A layer is planned only when its max/mean EP-rank load over the window is "
        "above this (1.0 = balanced).")
    max_moves_per_layer: int = Field(
        4, ge=1, description="Most expert swaps per layer per window (a swap moves two experts, one each way).")
    p2p_gbps: float = Field(
        DEFAULT_P2P_GBPS, gt=0, description="Point-to-point bandwidth assumed for the cost of a move, GB/s; the "
        "default, 50, is one 400 Gb/s NIC per GPU (NVLink is faster: the cost is then overstated).")
    moe_time_fraction: float = Field(
        DEFAULT_MOE_TIME_FRACTION, gt=0, le=1, description="Share of a step's time spent in the routed experts "
        "and all-to-alls of the MoE layers (split evenly over them), the part that scales with the max rank "
        "load; prices the predicted saving.")


class DataConfig(BaseModel):
    """Default data of examples/train.py (command-line flags override these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Optional[str] = Field(
        None, description="Text file or folder for byte-level LM; None = the Python standard library's sources; "
        "'random' = uniform random tokens over the vocabulary (benchmarks).")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of files (or of the bytes of a single file) "
                                "held out for validation; the split is fixed by sorted path order.")
    max_bytes: int = Field(64 * 2**20, ge=1024, description="Read at most this many bytes of the corpus (bytes).")
    seed: int = Field(1234, description="Seed of the batch sampler (the same batches for the same step).")
    val_interval: int = Field(50, ge=0, description="Optimizer steps between validation passes; 0 = never.")
    val_batches: int = Field(4, ge=1, description="Micro-batches per validation pass on each rank.")


class RuntimeConfig(BaseModel):
    """How a run guards itself against hangs, divergence and noise (piper_ds.runtime)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(
        600.0, gt=0, description="Process-group timeout (seconds) given to DeepSpeed's init_distributed, and how "
        "long a rank may go without a heartbeat before the others stop, naming it.")
    heartbeat: bool = Field(
        True, description="Run the heartbeat watchdog: every rank beats through the rendezvous store; a rank "
        "whose beat stops for timeout_s (frozen, stopped, killed) makes the others exit with code 4, naming it.")
    max_skipped_steps: int = Field(
        10, ge=0, description="Stop (exit code 3 in examples/train.py) after this many consecutive optimizer "
        "steps that DeepSpeed skipped or whose global gradient norm is not finite; 0 = never.")
    quiet_deepspeed: bool = Field(
        True, description="Hide DeepSpeed's repeated per-rank lines: its logger shows warnings on rank 0 only, "
        "its start-up prints are dropped. False restores them (examples/train.py: --deepspeed-logs).")
    lint_ds_config: bool = Field(
        True, description="Check DeepSpeed's own keys of the ds_config (piper_ds.config_lint): typos are "
        "errors with a suggestion.")


class CheckpointConfig(BaseModel):
    """Atomic checkpoints (piper_ds.runtime.checkpoint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    save_dir: Optional[str] = Field(
        None, description="Checkpoint folder examples/train.py uses when --save-dir is not given; None = no "
        "checkpoints.")
    keep_last: Optional[int] = Field(
        None, ge=1, description="Keep only the newest N complete checkpoints of the folder (older ones are "
        "deleted after each save); None = keep all.")
    verify: Literal["sha256", "size"] = Field(
        "sha256", description="What a resume checks against the manifest before loading: every file's size and "
        "SHA-256 (`sha256`), or sizes only (`size`, faster for large checkpoints).")
    layout_free_state: bool = Field(
        True, description="Also write the optimizer state by parameter name and global expert id (piper_state/: "
        "fp32 master weights, moments, step), so the checkpoint resumes under another world, data-parallel or EP "
        "size; costs one more copy of the optimizer state on disk and a gather at every save.")


class OptimizerConfig(BaseModel):
    """How the engines run DeepSpeed's optimizer (piper_ds.runtime.zero_step)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fused_step: Literal["auto", "on", "off"] = Field(
        "auto", description="ZeRO stage 1/2 step with one fused Adam(W) pass per gradient tensor (reads the bf16 "
        "gradient, clips, updates the fp32 master and moments, writes the bf16 weights) instead of DeepSpeed's five "
        "passes. 'auto': where supported (torch Adam/AdamW, i.e. \"torch_adam\": true; bf16 or fp32; no "
        "offload), else DeepSpeed's step with a log line saying why; 'on': an error if unsupported; 'off': "
        "DeepSpeed's step.")


class PiperConfig(BaseModel):
    """The ``"piper"`` block. ``model`` is a :class:`ModelSpec` block: ``{"preset": name, **overrides}`` or all
    fields; ``moe`` holds the routing/dispatch options of every MoE layer (its ``top_k``, ``activation`` and
    ``n_shared_experts`` come from ``model`` when a model is given)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Optional[ModelSpec] = Field(
        None, description="The reference model (piper_ds.models) to build: {'preset': name, ...} or all fields.")
    moe: MoEConfig = Field(default_factory=MoEConfig, description="Options of every PiperMoE layer.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Rank layout.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig,
                                     description="Pipeline schedule and stages per rank (pp_size > 1).")
    topology: TopologyConfig = Field(default_factory=TopologyConfig,
                                     description="Cluster shape (ranks per node) for the hierarchical all-to-all.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Metrics options.")
    data: DataConfig = Field(default_factory=DataConfig, description="Default data of examples/train.py.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig,
                                   description="Timeouts, heartbeat, divergence guard, log noise, config lint.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Atomic checkpoints.")
    balance: BalanceConfig = Field(default_factory=BalanceConfig,
                                   description="Expert-load window and expert migration between EP ranks.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig,
                                       description="The ZeRO optimizer step (fused or DeepSpeed's).")

    @field_validator("model", mode="before")
    @classmethod
    def _model_block(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and "preset" in value:
            return ModelSpec.from_block(value)
        return value

    def moe_for_model(self) -> MoEConfig:
        """The MoE options with ``top_k``, ``activation`` and ``n_shared_experts`` taken from the model (when
        one is given). Raises ValueError when the ``moe`` block sets one of them to another value."""
        return self.moe if self.model is None else merge_moe_with_model(self.model, self.moe)


def merge_moe_with_model(spec: ModelSpec, moe: Union[MoEConfig, Mapping[str, Any], None]) -> MoEConfig:
    """``moe`` (MoEConfig, dict or None) with the model's ``top_k``, ``activation``, ``n_shared_experts``.

    The model spec decides the architecture; an explicitly set, different value in ``moe`` is a ValueError.
    """
    cfg = moe if isinstance(moe, MoEConfig) else MoEConfig(**dict(moe or {}))
    update = {}
    for name in _SHARED_WITH_MODEL:
        want = getattr(spec, name)
        if name in cfg.model_fields_set and getattr(cfg, name) != want:
            raise ValueError(f"piper.moe.{name} ({getattr(cfg, name)!r}) contradicts piper.model.{name} "
                             f"({want!r}); set it in one place only")
        update[name] = want
    return MoEConfig(**{**cfg.model_dump(), **update})


def load_ds_config(config: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """A ds_config as a dict, from a dict or a JSON file path."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, str):
        with open(config) as f:
            return json.load(f)
    raise TypeError(f"config must be a dict or a JSON path, got {type(config).__name__}")


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    """The ZeRO stage a ds_config asks for (0 without a ``"zero_optimization"`` block)."""
    zero = ds_config.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0


def parse_piper_config(ds_config: Mapping[str, Any]) -> PiperConfig:
    """Validates the ``"piper"`` block of ``ds_config`` (an empty block when absent).

    Raises ValueError (pydantic's message: field path, value and reason) on any bad or unknown key.
    """
    block = ds_config.get("piper", {})
    schedule = (ds_config.get("pipeline") or {}).get("piper_schedule")
    if schedule is not None:  # DeepSpeed would keep the key and train 1F1B without a word
        raise ValueError(f'the pipeline schedule is set in "piper": {{"pipeline": {{"schedule": ...}}}}, not in '
                         f'DeepSpeed\'s "pipeline" block (found "piper_schedule": {json.dumps(schedule)})')
    if not isinstance(block, Mapping):
        raise ValueError(f'the "piper" block must be a JSON object, got {type(block).__name__}: {block!r}')
    try:
        cfg = PiperConfig(**block)
    except ValidationError as err:  # a ValidationError is a ValueError; re-raise with the block named
        raise ValueError(f'invalid "piper" block in the ds_config: {err}') from None
    if cfg.model is not None:
        cfg.moe_for_model()  # conflicts between model and moe blocks are config errors, found here
        if cfg.model.num_experts % cfg.parallel.ep_size:
            raise ValueError(f"piper.model.num_experts ({cfg.model.num_experts}) must be divisible by "
                             f"piper.parallel.ep_size ({cfg.parallel.ep_size})")
    return cfg
