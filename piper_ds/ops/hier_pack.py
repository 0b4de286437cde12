"""Pack / unpack of row segments for the hierarchical all-to-all (one thin wrapper around one kernel).

``segment_copy(src, src_starts, dst, dst_starts, lengths)`` copies K row segments; packing a message is the
case where ``dst_starts`` are consecutive, unpacking the case where ``src_starts`` are. Backends:

* ``"slices"``: one ``copy_`` per segment — best for a handful of segments (no metadata upload);
* ``"cuda"``: the ``piper_hier_pack`` op (csrc/hier_pack, JIT-built through op_builder) — one launch for any K;
* ``"cpu"``: the same op's C++ CPU path (``piper_hier_pack_cpu``, for tests and CPU runs);
* ``"reference"``: ``piper_ds.ops.reference.segment_copy_reference`` (index_select / index_put).

``"auto"`` (default) uses slices up to ``SLICES_MAX_SEGMENTS`` segments, then the CUDA op for CUDA tensors
when it builds, else the reference. A failed build is reported once as a warning and never retried.
"""
from __future__ import annotations

import warnings
from typing import Dict, Sequence

import torch

from piper_ds.ops import reference

SLICES_MAX_SEGMENTS = 8
_BACKENDS = ("auto", "slices", "cuda", "cpu", "reference")
_ops: Dict[str, object] = {}
_errors: Dict[str, str] = {}


def _builder_module():
    try:
        from op_builder import hier_pack as builders  # a source checkout
    except ImportError:
        from piper_ds.op_builder import hier_pack as builders  # the installed package
    return builders


def load_op(cuda: bool = True):
    """The built ``piper_hier_pack`` (cuda) or ``piper_hier_pack_cpu`` op, JIT-built on first call.

    Raises RuntimeError saying why when it cannot be built or loaded; a failure is remembered, not retried.
    """
    key = "cuda" if cuda else "cpu"
    if key in _ops:
        return _ops[key]
    if key in _errors:
        raise RuntimeError(_errors[key])
    try:
        builders = _builder_module()
        builder = builders.HierPackBuilder() if cuda else builders.HierPackCPUBuilder()
        if not builder.is_compatible():
            raise RuntimeError(f"{builder.NAME} cannot be built here: {builder.error_log}")
        _ops[key] = builder.load()
    except Exception as e:  # a compiler error is long: keep its last line in the message
        lines = str(e).strip().splitlines() or [type(e).__name__]
        _errors[key] = f"the {key} hier_pack op is unavailable: {lines[-1]}"
        raise RuntimeError(_errors[key]) from e
    return _ops[key]


def _check(src: torch.Tensor, dst: torch.Tensor, src_starts, dst_starts, lengths) -> None:
    if not (len(src_starts) == len(dst_starts) == len(lengths)):
        raise ValueError(f"segment lists differ in length: src_starts {len(src_starts)}, dst_starts "
                         f"{len(dst_starts)}, lengths {len(lengths)}")
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype or src.device != dst.device:
        raise ValueError(f"src {tuple(src.shape)} {src.dtype} {src.device} and dst {tuple(dst.shape)} "
                         f"{dst.dtype} {dst.device} must agree in row shape, dtype and device")
    for k, (a, b, n) in enumerate(zip(src_starts, dst_starts, lengths)):
        if n < 0 or a < 0 or b < 0 or a + n > src.shape[0] or b + n > dst.shape[0]:
            raise ValueError(f"segment {k}: rows [{a}, {a + n}) of src ({src.shape[0]} rows) -> "
                             f"[{b}, {b + n}) of dst ({dst.shape[0]} rows) is out of range")


def segment_copy(src: torch.Tensor, src_starts: Sequence[int], dst: torch.Tensor, dst_starts: Sequence[int],
                 lengths: Sequence[int], backend: str = "auto", check: bool = True) -> torch.Tensor:
    """dst[dst_starts[k]:+lengths[k]] = src[src_starts[k]:+lengths[k]] for every k; returns dst.

    src [S, ...] and dst [N, ...] are contiguous with equal row shape and dtype; the index lists are Python
    ints (the host knows them: they come from the exchanged counts).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if check:
        _check(src, dst, src_starts, dst_starts, lengths)
    segs = [(a, b, n) for a, b, n in zip(src_starts, dst_starts, lengths) if n > 0]
    if not segs:
        return dst
    if backend == "auto":
        backend = "slices" if len(segs) <= SLICES_MAX_SEGMENTS else "reference"
        if backend == "reference" and src.is_cuda and "cuda" not in _errors:
            try:
                load_op(cuda=True)
                backend = "cuda"
            except RuntimeError as e:
                warnings.warn(f"hier_pack: using the PyTorch reference ({e})", RuntimeWarning)
    if backend == "slices":
        for a, b, n in segs:
            dst[b:b + n].copy_(src[a:a + n])
        return dst
    meta = torch.tensor([[a for a, _, _ in segs], [b for _, b, _ in segs], [n for _, _, n in segs]],
                        dtype=torch.int64)
    if backend in ("cuda", "cpu"):
        if (backend == "cuda") != src.is_cuda:
            raise ValueError(f"backend {backend!r} cannot copy tensors on {src.device}")
        if not (src.is_contiguous() and dst.is_contiguous()):
            raise ValueError("the compiled segment copy needs contiguous src and dst")
        load_op(backend == "cuda").segment_copy(src, dst, meta.to(src.device, non_blocking=True),
                                                max(n for _, _, n in segs))
        return dst
    meta = meta.to(src.device)
    return reference.segment_copy_reference(src, meta[0], dst, meta[1], meta[2])


def pack(src: torch.Tensor, starts: Sequence[int], lengths: Sequence[int], backend: str = "auto") -> torch.Tensor:
    """A new contiguous tensor: the row segments (starts[k], lengths[k]) of src laid end to end."""
    out = src.new_empty((sum(lengths), ) + tuple(src.shape[1:]))
    firsts = [0] * len(lengths)
    for k in range(1, len(lengths)):
        firsts[k] = firsts[k - 1] + lengths[k - 1]
    return segment_copy(src, starts, out, firsts, lengths, backend)


def unpack(packed: torch.Tensor, dst: torch.Tensor, starts: Sequence[int], lengths: Sequence[int],
           backend: str = "auto") -> torch.Tensor:
    """Scatters consecutive pieces of ``packed`` to the row segments (starts[k], lengths[k]) of dst; returns dst."""
    firsts = [0] * len(lengths)
    for k in range(1, len(lengths)):
        firsts[k] = firsts[k - 1] + lengths[k - 1]
    return segment_copy(packed, firsts, dst, starts, lengths, backend)
