"""The MoE layer: router, dispatch phases, grouped experts (see DESIGN.md, "One MoE layer, as data flows")."""
from piper_ds.moe.config import MoEConfig
from piper_ds.moe.layer import FeedForward, PiperMoE
from piper_ds.moe.placement import ExpertPlacement

__all__ = ["MoEConfig", "PiperMoE", "FeedForward", "ExpertPlacement"]
