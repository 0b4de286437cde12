"""Resource model and layout planner: model/cluster specs, memory/compute/communication model, search.

``python -m piper_ds.plan`` is the command-line front end; ``python -m piper_ds.calibrate`` measures a
platform profile for it. Pure Python: nothing here needs a GPU, and importing it does not import torch.

    from piper_ds.planner import ModelSpec, ClusterSpec, Layout, estimate, search
    est = estimate(ModelSpec.preset("xmoe-small"), ClusterSpec.preset("h200-nvlink-ib400"),
                   Layout(dp=4, ep=4, zero_stage=2, micro_batch=4, grad_accum=32))
    print(est.tokens_per_s, est.mfu, est.worst.total)
"""
from piper_ds.planner.cluster import CLUSTERS, ClusterSpec, Layout, LinkTier
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.resources import Estimate, estimate
from piper_ds.planner.search import NothingFits, SearchOptions, SearchResult, best, search
from piper_ds.planner.specs import PRESETS, REPORTED, ModelSpec

__all__ = ["ModelSpec", "PRESETS", "REPORTED", "ClusterSpec", "CLUSTERS", "LinkTier", "Layout",
           "PlatformProfile", "Estimate", "estimate", "search", "best", "SearchOptions", "SearchResult",
           "NothingFits"]
