"""load(): a converted model built from a Hugging Face checkpoint directory, each rank reading only its experts.

The model is built on the meta device (no memory), everything but the routed experts is read from the
safetensors files into it, and each MoE block is converted with the experts of this process's EP rank read
from the files through ``safe_open`` (tensors are read one by one, on demand): an 8-expert model at ep_size 4
never holds more than 2 experts per layer on a rank. Checkpoints store the experts either one tensor per expert
and projection (what ``save_pretrained`` writes: ``...experts.<e>.gate_proj.weight`` [F, D], Mixtral's
``...block_sparse_moe.experts.<e>.w1.weight``) or fused (``...experts.gate_up_proj`` [E, 2F, D],
``...experts.down_proj`` [E, D, F]); both are read.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from piper_ds.integrations.hf.architectures import Architecture, BlockSpec, architecture_of
from piper_ds.integrations.hf.convert import ExpertSource, convert_blocks
from piper_ds.integrations.hf.model import HFMoEModel
from piper_ds.moe import MoEConfig

_INDEX, _SINGLE = "model.safetensors.index.json", "model.safetensors"
_EXPERT_KEY = re.compile(r"\.experts\.(\d+\.|gate_up_proj$|down_proj$)")


class CheckpointReader:
    """The safetensors files of a checkpoint directory; a tensor is read only when asked for.

    Raises ValueError when the directory has no safetensors checkpoint or when its index names a file that is
    missing (naming the files).
    """

    def __init__(self, path: str):
        self.path = path
        if os.path.isfile(os.path.join(path, _INDEX)):
            with open(os.path.join(path, _INDEX)) as f:
                self.file_of: Dict[str, str] = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, _SINGLE)):
            with safe_open(os.path.join(path, _SINGLE), framework="pt") as f:
                self.file_of = {key: _SINGLE for key in f.keys()}
        else:
            raise ValueError(f"{path!r} has neither {_SINGLE} nor {_INDEX}: not a safetensors checkpoint")
        missing = sorted({f for f in self.file_of.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise ValueError(f"checkpoint {path!r}: {_INDEX} names shard files that are missing: {missing}")
        self._open: Dict[str, Any] = {}

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def _handle(self, key: str):
        if key not in self.file_of:
            raise ValueError(f"checkpoint {self.path!r} has no tensor {key!r}")
        name = self.file_of[key]
        if name not in self._open:
            self._open[name] = safe_open(os.path.join(self.path, name), framework="pt").__enter__()
        return self._open[name]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (read now, on the CPU)."""
        return self._handle(key).get_tensor(key)

    def rows(self, key: str, ids: List[int]) -> torch.Tensor:
        """``tensor[ids]`` of the tensor ``key``, reading only those rows of the file."""
        sliced = self._handle(key).get_slice(key)
        return torch.cat([sliced[i:i + 1] for i in ids]) if ids else sliced[0:0]


class CheckpointExperts(ExpertSource):
    """Routed experts read from a checkpoint, per expert or fused, only the ones asked for."""

    def __init__(self, reader: CheckpointReader, architecture: Architecture, spec: BlockSpec):
        self.reader, self.architecture, self.spec = reader, architecture, spec

    def read(self, block_name, block, global_ids):
        s, arch = self.spec, self.architecture
        prefix = arch.checkpoint_key(f"{block_name}.experts.")
        gate, up, down = arch.expert_weights
        if any(key.startswith(prefix) and key[len(prefix)].isdigit() for key in self.reader.file_of):
            w_up, w_down = [], []
            for e in global_ids:
                g, u, d = (self._get(f"{prefix}{e}.{w}.weight", shape) for w, shape in (
                    (gate, (s.d_ffn, s.hidden_size)), (up, (s.d_ffn, s.hidden_size)), (down, (s.hidden_size, s.d_ffn))))
                w_up.append(torch.cat([g.t(), u.t()], dim=1))
                w_down.append(d.t())
            return torch.stack(w_up), torch.stack(w_down)
        fused = f"{block_name}.experts."
        if f"{fused}gate_up_proj" in self.reader.file_of:
            gate_up = self._check(self.reader.rows(f"{fused}gate_up_proj", global_ids), f"{fused}gate_up_proj",
                                  (len(global_ids), 2 * s.d_ffn, s.hidden_size))
            down_t = self._check(self.reader.rows(f"{fused}down_proj", global_ids), f"{fused}down_proj",
                                 (len(global_ids), s.hidden_size, s.d_ffn))
            return gate_up.transpose(1, 2), down_t.transpose(1, 2)
        raise ValueError(f"checkpoint {self.reader.path!r} has no experts for {block_name}: neither "
                         f"{prefix}<e>.{gate}.weight nor {fused}gate_up_proj")

    def _get(self, key: str, shape) -> torch.Tensor:
        return self._check(self.reader.get(key), key, shape)

    def _check(self, t: torch.Tensor, key: str, shape) -> torch.Tensor:
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"checkpoint {self.reader.path!r}: {key} has shape {tuple(t.shape)}, the config says "
                             f"{tuple(shape)}")
        return t


def load(path: str, ep_size: int = 1, ep_rank: Optional[int] = None,
         config: Union[MoEConfig, Dict[str, Any], None] = None, dtype: Optional[torch.dtype] = None,
         device: Union[str, torch.device, None] = None) -> HFMoEModel:
    """The converted model of the Hugging Face checkpoint directory ``path`` (``config.json`` and safetensors
    files), holding the routed experts of EP rank ``ep_rank`` only.

    Args:
        path: a local directory, as ``save_pretrained`` (or :func:`~piper_ds.integrations.hf.export`) writes it.
        ep_size, ep_rank, config: as for :func:`~piper_ds.integrations.hf.convert`.
        dtype: the parameters' dtype (default: the checkpoint config's ``dtype``, else float32).
        device: where the model ends up (default: CPU).

    ValueError when a tensor the model needs is missing, or a shard file the index names is (naming them).
    """
    hf_config = AutoConfig.from_pretrained(path)
    architecture = architecture_of(hf_config)
    spec = architecture.block_spec(hf_config)
    dtype = dtype or hf_config.dtype or torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    with CheckpointReader(path) as reader:
        _load_dense(model, reader, architecture, dtype)
        converted = convert_blocks(model, architecture, spec, config, ep_size, ep_rank,
                                   CheckpointExperts(reader, architecture, spec))
    _init_runtime_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"checkpoint {path!r} has no tensors for {left[:8]} ({len(left)} in all)")
    return converted if device is None else converted.to(device)


def _load_dense(model: nn.Module, reader: CheckpointReader, architecture: Architecture, dtype: torch.dtype) -> None:
    """Every tensor of the checkpoint but the routed experts, assigned into the meta-built ``model``."""
    wanted = set(model.state_dict().keys())
    state, unexpected = {}, []
    for key in reader.file_of:
        if _EXPERT_KEY.search(key):
            continue
        name = architecture.model_key(key)
        if name not in wanted:
            unexpected.append(key)
            continue
        t = reader.get(key)
        state[name] = t.to(dtype) if t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # the assigned embedding is a new tensor: tie the LM head to it again if the config ties
    if unexpected:
        warnings.warn(f"checkpoint {reader.path!r}: {len(unexpected)} tensors the model does not have were not "
                      f"read: {unexpected[:5]}")


def _init_runtime_buffers(model: nn.Module) -> None:
    """Buffers computed at construction and not stored (rotary frequencies) are still on the meta device: give
    them memory and let the model's own initialiser compute them, as ``from_pretrained`` does. They start as NaN
    so that one the initialiser does not compute is found (ValueError) instead of left uninitialised."""
    for module_name, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        for n in meta:
            b = getattr(module, n)
            if not b.is_floating_point():
                raise ValueError(f"buffer {module_name}.{n} ({b.dtype}) is neither in the checkpoint nor computable")
            setattr(module, n, torch.full(b.shape, float("nan"), dtype=b.dtype))
        model._init_weights(module)
        unset = [f"{module_name}.{n}" for n in meta if getattr(module, n).isnan().any()]
        if unset:
            raise ValueError(f"buffers {unset} are neither in the checkpoint nor computed by the model's initialiser")
