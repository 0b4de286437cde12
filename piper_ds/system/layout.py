"""A parallel layout of a training job: what the planner predicts and the ds_config it writes describes.

A :class:`Layout` is one way to run a model: data x pipeline parallel, expert parallel inside the
data-parallel group, ZeRO stage, batch split, activation checkpointing, the all-to-all algorithm and the
pipeline schedule.

Rank placement follows DeepSpeed: stage ``s`` owns global ranks ``[s*dp, (s+1)*dp)`` (data-parallel ranks
are consecutive), and an EP group is ``ep`` consecutive ranks of a stage's DP group. So an EP group sits in
one node exactly when ``ep`` divides ``gpus_per_node`` (or the job has fewer GPUs than a node).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Layout(BaseModel):
    """One parallel layout of a training job (per-GPU micro-batch in sequences)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dp: int = Field(..., ge=1, description="Data-parallel degree per pipeline stage (ranks of one stage).")
    ep: int = Field(1, ge=1, description="Expert-parallel degree; EP groups split the DP group (ep | dp).")
    pp: int = Field(1, ge=1, description="Pipeline stages.")
    zero_stage: int = Field(1, ge=0, le=3, description="DeepSpeed ZeRO stage (0, 1, 2; 3 is rejected with MoE).")
    micro_batch: int = Field(1, ge=1, description="Sequences per GPU per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per step (= pipeline micro-batches when pp > 1).")
    activation_checkpointing: bool = Field(False, description="Recompute each block in backward (full).")
    a2a: Literal["flat", "hierarchical"] = Field(
        "flat", description="MoE all-to-all: flat (one NCCL all-to-all) or hierarchical (intra, packed inter, "
        "intra redistribution; tokens sent once per destination node across nodes).")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="Training precision: bf16 mixed precision (fp32 master + Adam) or plain fp32.")
    overlap_a2a: bool = Field(
        False, description="Schedule overlaps one half-micro-batch's all-to-all with the other half's compute.")
    fused_optimizer: bool = Field(
        True, description="AdamW runs as one fused kernel (DeepSpeed's FusedAdam, or torch AdamW with "
        "fused=true); False = torch's foreach AdamW. Sets the optimizer's time and temporaries where DeepSpeed's "
        "own step runs it (ZeRO-0, or fused_step False).")
    fused_step: bool = Field(
        True, description="ZeRO-1/2 take the engines' fused optimizer step (piper.optimizer.fused_step 'auto', the "
        "default: one Adam(W) pass per gradient tensor); False = DeepSpeed's own step ('off'). Sets the "
        "optimizer's time and the step phase's memory; ZeRO-0 has no ZeRO step.")
    virtual_stages: int = Field(
        1, ge=1, le=2, description="Pipeline stages per rank: 1 (1F1B or the overlap schedule) or 2 (DeepSpeed's "
        "DualPipeV: rank r holds stages r and 2 pp - 1 - r; needs pp >= 2 and grad_accum >= 2 pp).")

    @model_validator(mode="after")
    def _check(self) -> "Layout":
        if self.dp % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide dp ({self.dp}): EP groups split the DP group")
        if self.virtual_stages == 2:
            if self.pp < 2 or self.grad_accum < 2 * self.pp or self.overlap_a2a:
                raise ValueError(f"virtual_stages 2 (DualPipeV) needs pp >= 2 (got {self.pp}), grad_accum >= 2 pp "
                                 f"(got {self.grad_accum}) and no overlap_a2a (got {self.overlap_a2a})")
        return self

    @property
    def gpus(self) -> int:
        """GPUs the layout uses: dp * pp."""
        return self.dp * self.pp

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of each expert (dp // ep)."""
        return self.dp // self.ep

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: micro_batch * grad_accum * dp."""
        return self.micro_batch * self.grad_accum * self.dp

    def short(self) -> str:
        """One-line label, e.g. 'pp2 dp4 ep4 z1 mb2x8 ckpt flat' (' ovl' / ' dualpipev' for those schedules)."""
        ck = " ckpt" if self.activation_checkpointing else ""
        sched = {"1f1b": "", "overlap": " ovl", "dualpipev": " dualpipev"}[self.schedule]
        return (f"pp{self.pp} dp{self.dp} ep{self.ep} z{self.zero_stage} "
                f"mb{self.micro_batch}x{self.grad_accum}{ck} {self.a2a}{sched}")

    @property
    def schedule(self) -> str:
        """The pipeline schedule this layout runs: '1f1b', 'overlap' or 'dualpipev'."""
        return "dualpipev" if self.virtual_stages == 2 else "overlap" if self.overlap_a2a else "1f1b"
