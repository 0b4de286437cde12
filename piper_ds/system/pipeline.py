"""The ``"piper": {"pipeline": {...}}`` block of a ds_config: which pipeline schedule runs, and how many stages
each pipeline rank holds. The planner writes it; ``piper_ds.initialize`` validates it with the rest of the
``"piper"`` block. DeepSpeed's own ``"pipeline"`` block keeps DeepSpeed's keys only (``use_reentrant``,
``activation_checkpoint_interval``, ...).

The known schedules and their stages per rank are listed here, once; :func:`check_schedule` is the one check
of a schedule name.
"""
from __future__ import annotations

from typing import Dict, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Every pipeline schedule, with the stages each pipeline rank holds under it.
SCHEDULE_STAGES: Dict[str, int] = {"1f1b": 1, "overlap": 1, "dualpipev": 2}


def check_schedule(name: str) -> str:
    """``name`` when it is a known schedule; ValueError listing the known ones otherwise."""
    if name not in SCHEDULE_STAGES:
        raise ValueError(f"unknown pipeline schedule {name!r}; known: {sorted(SCHEDULE_STAGES)}")
    return name


class PipelineConfig(BaseModel):
    """The ``"piper.pipeline"`` block (used when ``piper.parallel.pp_size`` > 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: str = Field(
        "1f1b", description="Pipeline schedule: '1f1b' (DeepSpeed's TrainSchedule), 'overlap' (1F1B whose "
        "micro-batches run as two halves, one half's all-to-all beside the other's compute; even micro-batch "
        "sizes) or 'dualpipev' (DeepSpeed's DualPipeV: two virtual stages per rank, gradient_accumulation_steps "
        ">= 2 pp).")
    virtual_stages: Optional[int] = Field(
        None, ge=1, description="Stages per pipeline rank; None = the schedule's (2 for 'dualpipev', else 1). "
        "When set it must be the schedule's.")

    @field_validator("schedule")
    @classmethod
    def _known(cls, value: str) -> str:
        return check_schedule(value)

    @model_validator(mode="after")
    def _stages_fit_schedule(self) -> "PipelineConfig":
        want = SCHEDULE_STAGES[self.schedule]
        if self.virtual_stages is not None and self.virtual_stages != want:
            raise ValueError(f"virtual_stages ({self.virtual_stages}) does not fit schedule {self.schedule!r}, "
                             f"which holds {want} stage(s) per rank")
        return self

    @property
    def stages_per_rank(self) -> int:
        """Stages each pipeline rank holds: 2 under DualPipeV, else 1."""
        return SCHEDULE_STAGES[self.schedule]
