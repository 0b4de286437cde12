"""Kernels of the MoE layer with their PyTorch references (``reference.py``, the oracle).

``fused_gating`` (router) and ``send_plan`` / ``expand_plan`` / ``combine_index`` / ``permute_rows`` /
``combine_rows`` (dispatch) run compiled ops when available (CUDA kernels, or the C++ CPU implementation) and the
references otherwise; the ``backend`` argument of each says which ("auto" | "cuda" | "cpu" | "reference").
Importing this package builds nothing and does not import DeepSpeed.
"""
from piper_ds.ops.gating import fused_gating
from piper_ds.ops.permute import RowInverse, combine_index, combine_rows, expand_plan, permute_rows, send_plan

__all__ = ["fused_gating", "send_plan", "expand_plan", "combine_index", "permute_rows", "combine_rows",
           "RowInverse"]
