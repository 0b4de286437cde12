"""Builders of the row-segment copy (csrc/hier_pack) that packs and unpacks the hierarchical all-to-all's
messages: ``piper_hier_pack`` (CUDA + CPU) and ``piper_hier_pack_cpu`` (CPU)."""
from .builder import PiperCPUOpBuilder, PiperOpBuilder

_CPP = ["hier_pack/hier_pack.cpp"]


class HierPackBuilder(PiperOpBuilder):
    """segment_copy(src, dst, meta_3K, max_rows) with its CUDA kernel compiled in."""

    NAME = "piper_hier_pack"
    SOURCES_CPP = _CPP
    SOURCES_CU = ["hier_pack/hier_pack_kernels.cu"]


class HierPackCPUBuilder(PiperCPUOpBuilder):
    """The same op, CPU implementation only."""

    NAME = "piper_hier_pack_cpu"
    SOURCES_CPP = _CPP
