"""piper_ds's op builders (shipped as ``piper_ds.op_builder``; a source checkout imports it as ``op_builder``).

``ALL_OPS`` maps each op name to its builder class, e.g.::

    piper_gating       fused router, CUDA kernels + CPU path     (needs a GPU and nvcc)
    piper_gating_cpu   fused router, CPU path only               (any C++ compiler)
    piper_permute      dispatch plans and row moves, CUDA + CPU  (needs a GPU and nvcc)
    piper_permute_cpu  dispatch plans and row moves, CPU only    (any C++ compiler)
    piper_activation   expert SwiGLU/GELU, CUDA kernels + CPU path
    piper_activation_cpu  the same, CPU path only
    piper_adamw        Adam(W) over fp32 master weights (the ZeRO step), CUDA + CPU
    piper_adamw_cpu    the same, CPU path only
    piper_rope         rotary position embedding (forward and its inverse), CUDA + CPU
    piper_rope_cpu     the same, CPU path only

It is found by scanning this package's modules for concrete builders (as DeepSpeed does for its own), so an op
registers itself by adding a module here. Importing this package is light: the builders (which import
DeepSpeed's op_builder) load on first access of ``ALL_OPS``. It deliberately defines no ``__deepspeed__``:
DeepSpeed probes ``from op_builder import __deepspeed__`` to detect its own source tree, and this package must
not pass for it.
"""
__all__ = ["ALL_OPS"]

_NOT_OPS = ("builder", "loader")


def _all_ops():
    import importlib
    import inspect
    import os
    import pkgutil
    from .builder import PiperCPUOpBuilder, PiperOpBuilder
    ops = {}
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]), key=lambda m: m.name):
        if info.name in _NOT_OPS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f".{info.name}", __name__)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, (PiperOpBuilder, PiperCPUOpBuilder)) and cls.__module__ == module.__name__:
                ops[cls.NAME] = cls
    return ops


def __getattr__(name):  # lazy, PEP 562; also serves `from op_builder import ALL_OPS`
    if name == "ALL_OPS":
        return _all_ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
