"""piper_ds: train Mixture-of-Experts language models fast inside DeepSpeed.

Importing this package is light (no DeepSpeed engine, no kernel build, works without a GPU); the heavy parts
load on first use.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "initialize", "shutdown", "PiperMoE"]


def __getattr__(name):  # lazy: `import piper_ds` must not pull DeepSpeed's engine or build kernels
    if name in ("initialize", "shutdown"):
        from piper_ds import api
        return getattr(api, name)
    if name == "PiperMoE":
        from piper_ds.moe import PiperMoE
        return PiperMoE
    raise AttributeError(f"module 'piper_ds' has no attribute {name!r}")
