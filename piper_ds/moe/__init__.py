"""The MoE layer: router, dispatcher, grouped experts (the data flow: ``piper_ds/moe/dispatcher.py``)."""
from piper_ds.moe.config import MoEConfig
from piper_ds.moe.layer import FeedForward, PiperMoE
from piper_ds.moe.placement import ExpertPlacement

__all__ = ["MoEConfig", "PiperMoE", "FeedForward", "ExpertPlacement"]
