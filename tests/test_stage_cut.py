"""One stage cut for the pipeline and the planner (piper_ds.system.stages): the pure-Python mirrors of
DeepSpeed's partition and optimizer-group rules give DeepSpeed's answers, and the stages the planner predicts
are the ones PiperPipelineModule / PiperDualPipeVModule build (pp = 2 on 2 gloo ranks)."""
import inspect
import random

import pytest

from piper_ds.planner.cluster import ClusterSpec
from piper_ds.planner.resources import estimate
from piper_ds.system.deepspeed_rules import MOE_GROUP_MAX_NUMEL, partition_balanced, partition_uniform
from piper_ds.system.layout import Layout
from piper_ds.system.specs import ModelSpec
from piper_ds.system.stages import blocks_between, layer_costs, moe_blocks_per_rank, stage_blocks, stage_bounds
from piper_ds.testing import run_distributed

# a large vocabulary and a dense first block: the embedding and the head weigh more than a block, so the cut
# is not the uniform one
SPEC = ModelSpec.preset("tiny", n_layers=8, n_dense_layers=1, vocab_size=2048, seq_len=16)
MB = 2
MOE = {"kernels": "reference", "transport": "flat"}


def test_partition_mirrors_deepspeed():
    from deepspeed.runtime import utils as ds_utils
    rng = random.Random(0)
    for _ in range(300):
        n, m = rng.randint(1, 14), rng.randint(1, 6)
        weights = [rng.choice([rng.random(), float(rng.randint(0, 3))]) for _ in range(n)]  # with exact ties
        assert partition_balanced(weights, m) == [int(x) for x in ds_utils.partition_balanced(weights, m)]
        assert partition_uniform(n, m) == [int(x) for x in ds_utils.partition_uniform(n, m)]
    with pytest.raises(ValueError, match="num_parts must be >= 1, got 0"):
        partition_balanced([1.0], 0)


def test_moe_group_cap_is_deepspeeds():
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer as split
    assert inspect.signature(split).parameters["max_group_size"].default == MOE_GROUP_MAX_NUMEL


def test_the_cut_covers_every_block_once_and_weighs_every_layer():
    for spec in (SPEC, SPEC.model_copy(update={"tie_embeddings": True})):
        costs = layer_costs(spec, MB, 1)
        assert len(costs) == spec.n_layers + (3 if spec.tie_embeddings else 2)
        assert sum(costs) == pytest.approx(2.0) and min(costs) >= 0
        for stages in (1, 2, 3, 4):
            blocks = stage_blocks(spec, MB, 1, stages)
            assert [b for r in blocks for b in r] == list(range(spec.n_layers))
    for stages in (2, 4):  # not the uniform cut of the 10 layer specs
        assert list(stage_bounds(SPEC, MB, 1, stages)) != partition_uniform(SPEC.n_layers + 2, stages)
    assert moe_blocks_per_rank(SPEC, MB, 1, 2, 1) == [4, 3] and moe_blocks_per_rank(SPEC, MB, 1, 2, 2) == [1, 6]
    assert blocks_between(SPEC, 0, 1) == range(0, 0) and blocks_between(SPEC, 9, 10) == range(8, 8)


def _build_cuts(rank, world_size):
    import deepspeed
    from piper_ds.pipeline.model import PiperDualPipeVModule, PiperPipelineModule
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for schedule, cls in (("1f1b", PiperPipelineModule), ("dualpipev", PiperDualPipeVModule)):
        module = cls(SPEC, MOE, ep_size=1, num_stages=2, micro_batch=MB, seed=0)
        bounds = (module.phase_bounds if schedule == "dualpipev"
                  else [(module.parts[module.stage_id], module.parts[module.stage_id + 1])])
        out[schedule] = {"parts": list(module.parts), "bounds": bounds}
    return out


def test_planner_predicts_the_stages_the_pipeline_builds():
    runs = run_distributed(_build_cuts, 2, timeout=240)
    cluster = ClusterSpec.preset("h200-nvlink-ib400")
    for schedule, virtual in (("1f1b", 1), ("dualpipev", 2)):
        layout = Layout(dp=1, pp=2, zero_stage=1, micro_batch=MB, grad_accum=4, virtual_stages=virtual)
        predicted = estimate(SPEC, cluster, layout).memory
        assert runs[0][schedule]["parts"] == list(stage_bounds(SPEC, MB, 1, 2 * virtual))
        for rank, run in enumerate(runs):
            built = [blocks_between(SPEC, a, b) for a, b in run[schedule]["bounds"]]
            assert predicted[rank].blocks == built, (schedule, rank)
