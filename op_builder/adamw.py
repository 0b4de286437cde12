"""Builders of the master-weight Adam(W) step (csrc/optim): ``piper_adamw`` (CUDA + CPU) and ``piper_adamw_cpu``
(CPU)."""
from .builder import PiperCPUOpBuilder, PiperOpBuilder

_CPP = ["optim/adamw.cpp"]


class AdamWBuilder(PiperOpBuilder):
    """Adam(W) over fp32 master ranges from low-precision gradients, writing the low-precision weights; CUDA
    kernels in."""

    NAME = "piper_adamw"
    SOURCES_CPP = _CPP
    SOURCES_CU = ["optim/adamw_kernels.cu"]


class AdamWCPUBuilder(PiperCPUOpBuilder):
    """The same op, CPU implementation only."""

    NAME = "piper_adamw_cpu"
    SOURCES_CPP = _CPP
