"""A PiperMoE layer's forward and backward captured as CUDA graphs (``MoEConfig.cuda_graph``).

At ep_size 1 the layer never waits for the device (every size is known on the host), so its forward and
backward can be captured and replayed: a replay costs a few microseconds of host time where the eager layer
spends hundreds on launches. One capture per input shape, made at the first training forward of that shape
with ``torch.cuda.make_graphed_callables`` (which warms the layer up first; the load counted for the
aux-loss-free bias during the warm-up is put back).

What a replay needs, and what is refused:
* training mode with gradients on and CUDA inputs; eval or no-grad forwards run the eager layer;
* each forward followed by its backward before the layer's next forward: the graph holds one forward's
  activations, and its outputs are static buffers that the next replay overwrites. Pipeline schedules with
  several micro-batches in flight and activation checkpointing of this layer need ``cuda_graph`` off; a second
  forward before the backward is a RuntimeError;
* parameters that keep their storage after the capture (DeepSpeed's ZeRO-1/2 update them in place);
* no host sync inside the layer: bf16 experts with D and F multiples of 8 and the fused ops built (a failed
  capture is a RuntimeError saying so).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn


class _Body(nn.Module):
    """The layer's tensors as a module whose parameters are the layer's (what make_graphed_callables needs); the
    layer is held outside the module tree, so no cycle is registered."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_layer", layer)

    def parameters(self, recurse: bool = True):
        return self._layer.parameters(recurse)

    def forward(self, x_TD: torch.Tensor):
        return self._layer.layer_tensors(x_TD)


class GraphedLayer:
    """Replays the layer's captured forward (and, through autograd, backward) for each input shape."""

    def __init__(self, layer: nn.Module):
        self._layer = layer
        self._graphs: Dict[Tuple, Callable] = {}
        self._pending = False  # a replayed forward whose backward has not run yet

    def applies(self, x_TD: torch.Tensor) -> bool:
        """Whether this forward runs the graph: CUDA input, training mode, gradients on."""
        return x_TD.is_cuda and self._layer.training and torch.is_grad_enabled()

    def __call__(self, x_TD: torch.Tensor):
        if self._pending:
            raise RuntimeError("PiperMoE cuda_graph: forward called again before the previous forward's backward; "
                               "the captured graph holds one forward's activations. Turn cuda_graph off for "
                               "pipeline schedules with several micro-batches in flight or activation checkpointing")
        key = (tuple(x_TD.shape), x_TD.dtype, x_TD.device, x_TD.requires_grad)
        graphed = self._graphs.get(key)
        if graphed is None:
            graphed = self._graphs[key] = self._capture(x_TD)
        outs = graphed(x_TD)
        if outs[0].requires_grad:
            self._pending = True
            outs[0].register_hook(self._backward_reached)
        # the small statistics are static buffers too: copies, so a caller may keep them past the next replay
        return (outs[0], outs[1]) + tuple(t.clone() for t in outs[2:])

    def _backward_reached(self, grad: torch.Tensor) -> torch.Tensor:
        self._pending = False
        return grad

    def _capture(self, x_TD: torch.Tensor) -> Callable:
        gate = self._layer.deepspeed_moe.gate
        pending_load = gate.pending_load.clone()  # the warm-up's routing must not count for the bias
        sample = x_TD.detach().clone().requires_grad_(x_TD.requires_grad)
        try:
            graphed = torch.cuda.make_graphed_callables(_Body(self._layer), (sample, ), allow_unused_input=True)
        except RuntimeError as err:
            raise RuntimeError(f"PiperMoE cuda_graph: capturing the layer failed ({err}). The layer must run "
                               "without host syncs: bf16 experts with hidden_size and d_ffn multiples of 8, "
                               "kernels 'auto' or 'cuda' with the fused ops built, ep_size 1") from err
        finally:
            gate.pending_load.copy_(pending_load)
        return graphed
