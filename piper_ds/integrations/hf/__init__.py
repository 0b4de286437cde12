"""Bring your own Hugging Face MoE model: convert its MoE blocks to PiperMoE, train it, export it back.

* :func:`convert` (``convert.py``): replaces the MoE blocks of a loaded ``...ForCausalLM`` in place;
* :func:`load` (``checkpoint.py``): builds the model from a checkpoint directory with each rank reading only its
  own experts from the safetensors files;
* :func:`export` (``export.py``): writes a checkpoint ``transformers``' ``from_pretrained`` reads, gathering the
  experts of every EP rank by global id.

Supported architectures: ``architectures.ARCHITECTURES`` (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, DeepSeek-V2,
DeepSeek-V3). Needs ``transformers`` (``pip install "piper_ds[hf]"``); ``import piper_ds`` does not.
"""
try:
    import transformers  # noqa: F401
except ImportError as err:  # say which extra brings it
    raise ImportError('piper_ds.integrations.hf needs transformers: pip install "piper_ds[hf]"') from err

from piper_ds.integrations.hf.architectures import ARCHITECTURES  # noqa: E402
from piper_ds.integrations.hf.checkpoint import load  # noqa: E402
from piper_ds.integrations.hf.convert import convert  # noqa: E402
from piper_ds.integrations.hf.export import export  # noqa: E402
from piper_ds.integrations.hf.model import HFMoEModel  # noqa: E402

__all__ = ["ARCHITECTURES", "HFMoEModel", "convert", "export", "load"]
