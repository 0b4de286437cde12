"""What the planner and the runtime share: the model spec, the parallel layout, the rules of DeepSpeed both
follow, and the pipeline's stage cut.

Pure Python (pydantic only): nothing here imports torch, DeepSpeed, the planner or the runtime packages, so
both sides import it (checked by the import contracts in ``.importlinter``).

* :mod:`~piper_ds.system.specs` — :class:`ModelSpec` (the ``"piper.model"`` block) and its presets;
* :mod:`~piper_ds.system.layout` — :class:`Layout`, one parallel layout of a job;
* :mod:`~piper_ds.system.deepspeed_rules` — DeepSpeed's MoE optimizer-group cut and stage partition;
* :mod:`~piper_ds.system.activations` — activation bytes of a block;
* :mod:`~piper_ds.system.stages` — the per-layer costs and the stage cut;
* :mod:`~piper_ds.system.pipeline` — the ``"piper.pipeline"`` block: schedule and virtual stages;
* :mod:`~piper_ds.system.migration` — expert migration's bytes per expert, transfer time and break-even.
"""
from piper_ds.system.layout import Layout
from piper_ds.system.specs import PRESETS, REPORTED, ModelSpec

__all__ = ["ModelSpec", "PRESETS", "REPORTED", "Layout"]
