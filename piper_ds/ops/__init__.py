"""Kernels of the MoE layer, the attention's rotary embedding and the optimizer step with their PyTorch
references (``reference.py``, the oracle).

Every op runs a compiled implementation when available (CUDA kernels, or the C++ CPU implementation) and its
reference otherwise; the ``backend`` argument of each says which ("auto" | "cuda" | "cpu" | "reference"):

* ``fused_gating`` (router: scores, top-k, weights, counts);
* ``send_plan`` / ``route_plan`` (dispatch plans) and ``expand_rows`` / ``reduce_rows`` (row movement along a fan
  index, :mod:`piper_ds.ops.plans`);
* ``activation_forward`` / ``activation_backward`` (SwiGLU, GELU) and ``grouped_mlp`` (the experts);
* ``rotary`` (the attention's rotary position embedding);
* ``adamw_step`` (Adam(W) over fp32 master weights from low-precision gradients: the fused ZeRO step).

Importing this package builds nothing and does not import DeepSpeed.
"""
from piper_ds.ops.activation import activation_backward, activation_forward
from piper_ds.ops.adamw import adamw_step
from piper_ds.ops.experts import grouped_mlp
from piper_ds.ops.gating import fused_gating
from piper_ds.ops.permute import expand_rows, reduce_rows, route_plan, send_plan
from piper_ds.ops.plans import RoutePlan, SendPlan
from piper_ds.ops.rope import rotary

__all__ = ["fused_gating", "send_plan", "route_plan", "expand_rows", "reduce_rows", "activation_forward",
           "activation_backward", "grouped_mlp", "adamw_step", "rotary", "SendPlan", "RoutePlan"]
