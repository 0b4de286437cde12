"""Backend choice for the piper_ds ops: which compiled module (or None = the PyTorch reference) runs a call.

``backend``:
  * ``"auto"``: CUDA tensors use the CUDA op when it is compatible (built now if needed; a failed build warns
    once and falls back); CPU tensors use the C++ CPU op when it is already built (AOT-installed, in the JIT
    cache, or the CUDA op is loaded) or ``PIPER_JIT_CPU_OPS=1`` allows building it; everything else uses the
    PyTorch reference.
  * ``"cuda"``: the CUDA op or a RuntimeError saying why not (tensors must be on CUDA).
  * ``"cpu"``: the C++ CPU implementation (tensors must be on the CPU): the CUDA op's if that one is loaded,
    else the CPU-only op, built now if needed.
  * ``"reference"``: always the PyTorch reference.

Nothing here runs at import time; a missing toolchain never breaks ``import piper_ds`` or ``import deepspeed``.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple

BACKENDS = ("auto", "cuda", "cpu", "reference")

_CUDA_BUILDER = {"gating": "GatingBuilder", "permute": "PermuteBuilder", "activation": "ActivationBuilder",
                 "adamw": "AdamWBuilder", "rope": "RopeBuilder"}
_CPU_BUILDER = {"gating": "GatingCPUBuilder", "permute": "PermuteCPUBuilder", "activation": "ActivationCPUBuilder",
                "adamw": "AdamWCPUBuilder", "rope": "RopeCPUBuilder"}
_cache: Dict[Tuple[str, str, str], object] = {}
_failed: Dict[str, str] = {}


def check_backend(backend: str) -> None:
    """Raises ValueError unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _builder(op: str, cuda: bool):
    from . import activation, adamw, gating, permute, rope  # the modules hold the builder classes
    module = {"gating": gating, "permute": permute, "activation": activation, "adamw": adamw, "rope": rope}[op]
    return getattr(module, (_CUDA_BUILDER if cuda else _CPU_BUILDER)[op])()


def _try_load(builder, strict: bool):
    """Loads ``builder``'s module; on failure raises (strict) or warns once and returns None."""
    if builder.NAME in _failed and not strict:
        return None
    try:
        return builder.load(verbose=False)
    except Exception as err:  # noqa: BLE001 - a build failure must not take training down in auto mode
        _failed[builder.NAME] = f"{type(err).__name__}: {err}"
        if strict:
            raise RuntimeError(f"building/loading the {builder.NAME} op failed: {err}") from err
        warnings.warn(f"piper_ds: the {builder.NAME} op failed to build or load ({err}); using the PyTorch "
                      "reference instead", RuntimeWarning, stacklevel=3)
        return None


def _auto_cpu(op: str):
    cuda_builder = _builder(op, cuda=True)
    if cuda_builder.NAME in cuda_builder._loaded_ops:  # the CUDA build also carries the CPU implementation
        return cuda_builder._loaded_ops[cuda_builder.NAME]
    cpu_builder = _builder(op, cuda=False)
    if cpu_builder.NAME in cpu_builder._loaded_ops:
        return cpu_builder._loaded_ops[cpu_builder.NAME]
    if cpu_builder.is_built() or os.environ.get("PIPER_JIT_CPU_OPS", "0") == "1":
        if cpu_builder.is_compatible():
            return _try_load(cpu_builder, strict=False)
    return None


def get_op(op: str, device_type: str, backend: str = "auto") -> Optional[object]:
    """The compiled module that runs ``op`` (a key of ``_CUDA_BUILDER``) on ``device_type`` tensors, or None.

    None means: use the PyTorch reference. Raises ValueError for a backend that cannot serve the device and
    RuntimeError when a forced backend cannot be built.
    """
    check_backend(backend)
    if backend == "reference":
        return None
    key = (op, device_type, backend)
    if key in _cache:
        return _cache[key]
    if backend == "cuda":
        if device_type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device_type!r}")
        builder = _builder(op, cuda=True)
        if not builder.is_compatible():
            raise RuntimeError(f"backend='cuda': the {builder.NAME} op cannot be built here ({builder.error_log})")
        module = _try_load(builder, strict=True)
    elif backend == "cpu":
        if device_type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device_type!r}")
        cuda_builder = _builder(op, cuda=True)
        if cuda_builder.NAME in cuda_builder._loaded_ops:  # already loaded: it carries the CPU implementation
            return cuda_builder._loaded_ops[cuda_builder.NAME]
        builder = _builder(op, cuda=False)
        if not builder.is_compatible():
            raise RuntimeError(f"backend='cpu': the {builder.NAME} op cannot be built here ({builder.error_log})")
        module = _try_load(builder, strict=True)
    elif device_type == "cuda":
        builder = _builder(op, cuda=True)
        module = _try_load(builder, strict=False) if builder.is_compatible() else None
    elif device_type == "cpu":
        module = _auto_cpu(op)
        if module is None:
            return None  # not cached: a later build (or PIPER_JIT_CPU_OPS) may make it available
    else:
        module = None
    _cache[key] = module
    return module


def failures() -> Dict[str, str]:
    """Ops whose build or load failed in this process, with the error (shown by ``python -m piper_ds.env``)."""
    return dict(_failed)
