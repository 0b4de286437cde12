"""Builders of the expert activations (csrc/activation): ``piper_activation`` (CUDA + CPU) and
``piper_activation_cpu`` (CPU)."""
from .builder import PiperCPUOpBuilder, PiperOpBuilder

_CPP = ["activation/activation.cpp"]


class ActivationBuilder(PiperOpBuilder):
    """SwiGLU / GELU forward and backward (with the activation recomputed in the backward); CUDA kernels in."""

    NAME = "piper_activation"
    SOURCES_CPP = _CPP
    SOURCES_CU = ["activation/activation_kernels.cu"]


class ActivationCPUBuilder(PiperCPUOpBuilder):
    """The same op, CPU implementation only."""

    NAME = "piper_activation_cpu"
    SOURCES_CPP = _CPP
