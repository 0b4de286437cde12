"""Resource model and layout planner: model/cluster specs, memory/compute/communication model, search.

``python -m piper_ds.plan`` is the command-line front end; ``python -m piper_ds.calibrate`` measures a
platform profile for it. Pure Python: nothing here needs a GPU or imports torch.
"""
from piper_ds.planner.specs import PRESETS, REPORTED, ModelSpec

__all__ = ["ModelSpec", "PRESETS", "REPORTED"]
