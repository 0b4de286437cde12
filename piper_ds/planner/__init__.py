"""Resource model and layout planner: cluster specs, memory/compute/communication model, search.

``python -m piper_ds.plan`` is the command-line front end; ``python -m piper_ds.bench.calibrate`` measures a
platform profile for it. Pure Python: nothing here needs a GPU, and importing it does not import torch. The
model spec and the layout it reasons about live in :mod:`piper_ds.system`, shared with the runtime.

    from piper_ds.planner import ClusterSpec, estimate
    from piper_ds.system import Layout, ModelSpec
    est = estimate(ModelSpec.preset("xmoe-small"), ClusterSpec.preset("h200-nvlink-ib400"),
                   Layout(dp=4, ep=4, zero_stage=2, micro_batch=4, grad_accum=32))
    print(est.tokens_per_s, est.mfu, est.worst.total)
"""
from piper_ds.planner.cluster import CLUSTERS, ClusterSpec, LinkTier
from piper_ds.planner.profile import PlatformProfile
from piper_ds.planner.resources import Estimate, estimate
from piper_ds.planner.search import NothingFits, SearchOptions, SearchResult, best, search

__all__ = ["ClusterSpec", "CLUSTERS", "LinkTier", "PlatformProfile", "Estimate", "estimate", "search", "best",
           "SearchOptions", "SearchResult", "NothingFits"]
