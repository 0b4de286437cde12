"""The ``"piper": {"pipeline": {...}}`` block: one check of the schedule name, validated when
``piper_ds.initialize`` starts (before any process group), and written by the planner."""
import pytest
import torch

import piper_ds
from piper_ds.pipeline.schedules import SCHEDULES, make_schedule
from piper_ds.system.pipeline import SCHEDULE_STAGES, PipelineConfig

KNOWN = r"known: \['1f1b', 'dualpipev', 'overlap'\]"


def _config(**pipeline_blocks):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
            "piper": {"model": {"preset": "tiny"}, "parallel": {"pp_size": 2}}, **pipeline_blocks}


def test_a_typo_in_the_schedule_fails_at_initialize_naming_the_known_ones():
    cfg = _config()
    cfg["piper"]["pipeline"] = {"schedule": "1f1b_typo"}
    with pytest.raises(ValueError, match=r"unknown pipeline schedule '1f1b_typo'; " + KNOWN):
        piper_ds.initialize(model=torch.nn.Linear(2, 2), config=cfg)


def test_the_schedule_is_not_read_from_deepspeeds_pipeline_block():
    cfg = _config(pipeline={"use_reentrant": False, "piper_schedule": "dualpipev"})
    with pytest.raises(ValueError, match=r'"piper": \{"pipeline": \{"schedule": \.\.\.\}\}.*"piper_schedule": '
                                         r'"dualpipev"'):
        piper_ds.initialize(model=torch.nn.Linear(2, 2), config=cfg)


def test_stages_per_rank_follow_the_schedule():
    assert set(SCHEDULES) == set(SCHEDULE_STAGES)  # a class for every name the config accepts
    assert PipelineConfig().schedule == "1f1b" and PipelineConfig().stages_per_rank == 1
    assert PipelineConfig(schedule="dualpipev").stages_per_rank == 2
    assert PipelineConfig(schedule="dualpipev", virtual_stages=2).virtual_stages == 2
    with pytest.raises(ValueError, match=r"virtual_stages \(2\) does not fit schedule 'overlap'"):
        PipelineConfig(schedule="overlap", virtual_stages=2)
    with pytest.raises(ValueError, match="extra"):
        PipelineConfig(schedule="1f1b", chunks=2)
    with pytest.raises(ValueError, match=r"unknown pipeline schedule 'zb'; " + KNOWN):
        make_schedule("zb", 4, 2, 0)
