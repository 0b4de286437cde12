"""Builders of the dispatch permutation (csrc/permute): ``piper_permute`` (CUDA + CPU), ``piper_permute_cpu`` (CPU)."""
from .builder import PiperCPUOpBuilder, PiperOpBuilder

_CPP = ["permute/permute.cpp"]


class PermuteBuilder(PiperOpBuilder):
    """Send/expand plans (counting sorts), row gather and weighted combine with backward; CUDA kernels compiled in."""

    NAME = "piper_permute"
    SOURCES_CPP = _CPP
    SOURCES_CU = ["permute/plan_kernels.cu", "permute/rows_kernels.cu"]


class PermuteCPUBuilder(PiperCPUOpBuilder):
    """The same op, CPU implementation only."""

    NAME = "piper_permute_cpu"
    SOURCES_CPP = _CPP
