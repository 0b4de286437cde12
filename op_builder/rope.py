"""Builders of the rotary position embedding (csrc/rope): ``piper_rope`` (CUDA + CPU) and ``piper_rope_cpu`` (CPU)."""
from .builder import PiperCPUOpBuilder, PiperOpBuilder

_CPP = ["rope/rope.cpp"]


class RopeBuilder(PiperOpBuilder):
    """Rotary embedding forward and inverse (its backward) in one pass each; CUDA kernels in."""

    NAME = "piper_rope"
    SOURCES_CPP = _CPP
    SOURCES_CU = ["rope/rope_kernels.cu"]


class RopeCPUBuilder(PiperCPUOpBuilder):
    """The same op, CPU implementation only."""

    NAME = "piper_rope_cpu"
    SOURCES_CPP = _CPP
