"""Builders of the fused router (csrc/gating): ``piper_gating`` (CUDA + CPU) and ``piper_gating_cpu`` (CPU)."""
from .builder import PiperCPUOpBuilder, PiperOpBuilder

_CPP = ["gating/gating.cpp"]


class GatingBuilder(PiperOpBuilder):
    """Scores, biased group-limited top-k, weights and tokens per expert, with backward; CUDA kernels compiled in."""

    NAME = "piper_gating"
    SOURCES_CPP = _CPP
    SOURCES_CU = ["gating/gating_kernels.cu"]


class GatingCPUBuilder(PiperCPUOpBuilder):
    """The same op, CPU implementation only."""

    NAME = "piper_gating_cpu"
    SOURCES_CPP = _CPP
