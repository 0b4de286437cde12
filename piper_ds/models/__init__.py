"""The reference MoE transformer used by examples, tests and benchmarks (see transformer.py)."""
from piper_ds.models.transformer import MoETransformer, build_model

__all__ = ["MoETransformer", "build_model"]
